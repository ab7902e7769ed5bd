"""Typed views and validation of the non-federated paradigms' config: `distributed.*`, `ps.*`, `gossip.*`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from raypfl.config import build_spec, knob, require

FEDERATED = "federated"
PARADIGMS = (FEDERATED, "ps_sync", "ps_async", "allreduce", "gossip")
COMBINES = ("sum", "mean")
STALE_POLICIES = ("drop", "scale")
TOPOLOGIES = ("ring", "torus", "complete", "random_regular")
GOSSIP_VARIANTS = ("mixing", "pairwise")


@dataclass(frozen=True)
class DistributedSpec:
    """Workers, batches and the budget shared by ps_sync, ps_async, allreduce and gossip: `distributed.*`."""

    workers: int = knob(2, ge=1)  # Ray actors; ps/allreduce: one data shard each; gossip: hosts of the nodes
    batch_size: int = knob(32, ge=1)  # per worker (gossip: per node) per step
    # budget: samples processed = epochs x training-set size, all workers together
    epochs: float = knob(3.0, gt=0)
    # evaluate the model every this many samples processed (and at the end)
    eval_samples: int = knob(12000, ge=1)
    # this worker sleeps straggler_delay_s before each step
    straggler: int | None = knob(None, ge=0, expect="a worker index", null="none")
    straggler_delay_s: float = knob(0.0, ge=0)

    def total_samples(self, train_size: int) -> int:
        return max(1, math.ceil(self.epochs * train_size))


@dataclass(frozen=True)
class PSSpec:
    """Parameter-server SGD: `ps.*`."""

    combine: str = knob("mean", choices=COMBINES)  # sync: sum | mean of the gradients of one version
    keep_versions: int = knob(4, ge=1)  # versions the server keeps for pull(v)
    # async: gradients computed on a version older than this are dropped
    max_staleness: int | None = knob(4, ge=0, null="unbounded")
    # async: drop (apply the others fully) | scale (weight 1 / (1 + staleness))
    stale_policy: str = knob("drop", choices=STALE_POLICIES)


@dataclass(frozen=True)
class GossipSpec:
    """Decentralized training: `gossip.*`."""

    # training nodes (each its own model and shard), hosted by distributed.workers actors
    nodes: int = knob(8, ge=2)
    topology: str = knob("ring", choices=TOPOLOGIES)  # ring | torus | complete | random_regular
    degree: int = knob(3, ge=1)  # random_regular: neighbours per node
    local_steps: int = knob(20, ge=1)  # batches each node trains between two gossip steps
    # mixing (x_i <- sum_j W_ij x_j) | pairwise (running average with each node)
    variant: str = knob("mixing", choices=GOSSIP_VARIANTS)
    node_test_limit: int = knob(2000, ge=1)  # each node's own accuracy is measured on the first N test images


def paradigm_of(cfg: DictConfig) -> str:
    return str(cfg.get("paradigm") or FEDERATED)


def distributed_spec(cfg: DictConfig) -> DistributedSpec:
    return build_spec(DistributedSpec, cfg.get("distributed") or {}, "distributed")


def ps_spec(cfg: DictConfig) -> PSSpec:
    return build_spec(PSSpec, cfg.get("ps") or {}, "ps")


def gossip_spec(cfg: DictConfig) -> GossipSpec:
    return build_spec(GossipSpec, cfg.get("gossip") or {}, "gossip")


def validate_paradigm(cfg: DictConfig) -> None:
    """Check `paradigm` and, for the non-federated ones, `distributed.*`, `ps.*` and `gossip.*`."""
    paradigm = paradigm_of(cfg)
    require(paradigm in PARADIGMS, f"paradigm={paradigm} must be one of {', '.join(PARADIGMS)}")
    if paradigm == FEDERATED:
        return
    require(cfg.runtime.name == "ray", f"paradigm={paradigm} runs on Ray actors: runtime={cfg.runtime.name}")
    d = distributed_spec(cfg)  # every key's type and range: the specs' knobs
    if d.straggler is not None:
        require(
            d.straggler < d.workers,
            f"distributed.straggler={d.straggler} must be a worker index in [0, {d.workers})",
        )
    if paradigm == "allreduce":
        require(d.workers >= 2, f"paradigm=allreduce needs distributed.workers >= 2, got {d.workers}")
    if paradigm == "gossip":
        g = gossip_spec(cfg)
        require(d.workers <= g.nodes, f"distributed.workers={d.workers} > gossip.nodes={g.nodes}: idle hosts")
        if g.topology == "random_regular":
            require(
                0 < g.degree < g.nodes and g.nodes * g.degree % 2 == 0,
                f"gossip.degree={g.degree}: a random regular graph needs 0 < degree < gossip.nodes="
                f"{g.nodes} and nodes x degree even",
            )
