"""The reference workload W of the round-speed benchmark, shared by every implementation.

W: MNIST, 100 IID clients of 600 images, 10 clients per round, 1 local epoch, batch 10, SGD lr 0.05,
FedAvg weighted by samples, central test evaluation (10,000 images) every round; model `mlp` or `cnn`.

Every implementation (raypfl's runtimes, the plain-loop floor, Flower, pfl) takes its data, partition,
initial weights, cohorts and per-client shuffles from here, so they do the same arithmetic, and reports
through `RoundClock`, so they are timed the same way: wall-clock time at the end of each round
(after that round's evaluation), relative to the start of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

from raypfl.config import ClientsSpec
from raypfl.data.datasets import Dataset, load_dataset
from raypfl.data.partitions import StaticPartition, iid
from raypfl.driver.selection import CohortSampler
from raypfl.models.io import initial_weights
from raypfl.runtime.worker import client_seed


@dataclass(frozen=True)
class Workload:
    """W's knobs; the defaults are the issue's reference workload."""

    model: str = "mlp"
    rounds: int = 12
    seed: int = 0
    num_clients: int = 100
    per_round: int = 10
    local_epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    train_limit: int | None = None  # quick runs (tests) only
    test_limit: int | None = None

    def overrides(self) -> list[str]:
        """The same workload as `python -m raypfl` overrides."""
        return [
            f"model={self.model}",
            f"seed={self.seed}",
            f"clients.num={self.num_clients}",
            f"clients.per_round={self.per_round}",
            f"train.rounds={self.rounds}",
            f"train.local_epochs={self.local_epochs}",
            f"train.batch_size={self.batch_size}",
            f"optim.lr={self.lr}",
            "partition=iid",
            f"dataset.train_limit={self.train_limit or 'null'}",
            f"dataset.test_limit={self.test_limit or 'null'}",
            "train.checkpoint_every=0",
        ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags every implementation script takes."""
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True, help="JSON file with the per-round clock")


def from_args(args: argparse.Namespace) -> Workload:
    return Workload(
        model=args.model,
        rounds=args.rounds,
        seed=args.seed,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
    )


def load(w: Workload) -> tuple[Dataset, StaticPartition, np.ndarray]:
    """MNIST (normalised float32 arrays), the IID partition and the round-0 weights, all from the seed."""
    data = load_dataset("mnist", None, download=False, train_limit=w.train_limit, test_limit=w.test_limit)
    partition = iid(data.train_y, w.num_clients, w.seed)
    return data, partition, initial_weights(w.model, data, w.seed)


def cohort(w: Workload, round_idx: int) -> list[int]:
    """The clients of round `round_idx` (from 1): raypfl's seeded sampler, so every implementation agrees."""
    spec = ClientsSpec(num=w.num_clients, per_round=w.per_round)
    return CohortSampler(spec, w.seed).cohort(round_idx)


def shuffle_seed(w: Workload, round_idx: int, client: int) -> int:
    """Seed of a client's batch order in a round (a `torch.Generator` seed), as raypfl's workers use it."""
    return client_seed(w.seed, round_idx, client)


class RoundClock:
    """Records the end of every round (after its evaluation) and writes the JSON the driver reads."""

    def __init__(self, impl: str, w: Workload, out: Path):
        self.impl, self.w, self.out = impl, w, Path(out)
        self.rounds: list[dict] = []
        self.extra: dict = {}

    def round_done(self, round_idx: int, test_acc: float) -> None:
        self.rounds.append({"round": int(round_idx), "t": time.time(), "test_acc": float(test_acc)})
        print(f"[{self.impl}] round {round_idx}: test accuracy {test_acc:.4f}", flush=True)

    def write(self) -> None:
        """Times are seconds since this process started (its create time, before Python even imported)."""
        start = psutil.Process(os.getpid()).create_time()
        rounds = [{**r, "t": r["t"] - start} for r in self.rounds]
        record = {"impl": self.impl, "workload": asdict(self.w), "rounds": rounds, **self.extra}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(record, indent=1))
