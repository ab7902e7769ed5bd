"""One root seed drives everything: every other seed is derived from it and a purpose tag."""

from __future__ import annotations

import numpy as np

# Purpose tags: a derived seed depends on (root, tag, *keys) and on nothing else,
# so a client's randomness does not depend on which process trains it.
INIT = 0
SELECTION = 1
CLIENT = 2
PARTITION = 3
DATA = 4
FAULT = 5
SPEED = 6
KILL = 7
SYNTHETIC = 8  # dataset=synthetic: client sizes, generating models, samples
GOSSIP = 9  # random gossip topologies
SHARD = 10  # batch order of a worker or node in the non-federated paradigms
HOLDOUT = 11  # each client's held-out test samples (partition.client_test_fraction)
PARTIAL = 12  # which clients of a cohort do partial work, and how much (clients.partial_work_fraction)
ATTACK = 13  # which clients are malicious, and a gaussian attacker's noise per (round, client)
POSTPROCESS = 14  # stochastic client postprocessors (quantize, local_dp), per (round, client, step)
CENTRAL_NOISE = 15  # central DP noise, per server version
DEVICE = 16  # device profiles of the virtual clock (compute speed, bandwidths)
STREAM = 17  # asynchronous FL: which idle client starts next, per dispatch; ties of equal finish times


def derive_seed(root: int, tag: int, *keys: int) -> int:
    """A 63-bit seed for (root, tag, *keys), stable across processes and platforms."""
    words = np.random.SeedSequence([int(root), int(tag), *map(int, keys)]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def rng(root: int, tag: int, *keys: int) -> np.random.Generator:
    """A numpy generator seeded from (root, tag, *keys)."""
    return np.random.default_rng(derive_seed(root, tag, *keys))
