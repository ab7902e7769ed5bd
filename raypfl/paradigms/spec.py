"""Typed views and validation of the non-federated paradigms' config: `distributed.*`, `ps.*`, `gossip.*`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from raypfl.config import _positive_int, _require, _spec

FEDERATED = "federated"
PARADIGMS = (FEDERATED, "ps_sync", "ps_async", "allreduce", "gossip")
COMBINES = ("sum", "mean")
STALE_POLICIES = ("drop", "scale")
TOPOLOGIES = ("ring", "torus", "complete", "random_regular")
GOSSIP_VARIANTS = ("mixing", "pairwise")


@dataclass(frozen=True)
class DistributedSpec:
    """Workers, batches and the budget shared by ps_sync, ps_async, allreduce and gossip: `distributed.*`."""

    workers: int = 2  # Ray actors; ps/allreduce: one data shard each; gossip: hosts of the nodes
    batch_size: int = 32  # per worker (gossip: per node) per step
    epochs: float = 3.0  # budget: samples processed = epochs x training-set size, all workers together
    eval_samples: int = 12000  # evaluate the model every this many samples processed (and at the end)
    straggler: int | None = None  # this worker sleeps straggler_delay_s before each step
    straggler_delay_s: float = 0.0

    def total_samples(self, train_size: int) -> int:
        return max(1, math.ceil(self.epochs * train_size))


@dataclass(frozen=True)
class PSSpec:
    """Parameter-server SGD: `ps.*`."""

    combine: str = "mean"  # sync: sum | mean of the workers' gradients for one version
    keep_versions: int = 4  # versions the server keeps for pull(v)
    max_staleness: int | None = 4  # async: gradients computed on a version older than this are dropped
    stale_policy: str = "drop"  # async: drop (apply the others fully) | scale (weight 1 / (1 + staleness))


@dataclass(frozen=True)
class GossipSpec:
    """Decentralized training: `gossip.*`."""

    nodes: int = 8  # training nodes (each its own model and shard), hosted by distributed.workers actors
    topology: str = "ring"  # ring | torus | complete | random_regular
    degree: int = 3  # random_regular: neighbours per node
    local_steps: int = 20  # batches each node trains between two gossip steps
    variant: str = "mixing"  # mixing (x_i <- sum_j W_ij x_j) | pairwise (running average with each node)
    node_test_limit: int = 2000  # each node's own accuracy is measured on the first N test images


def paradigm_of(cfg: DictConfig) -> str:
    return str(cfg.get("paradigm") or FEDERATED)


def distributed_spec(cfg: DictConfig) -> DistributedSpec:
    return _spec(DistributedSpec, cfg.get("distributed") or {}, "distributed")


def ps_spec(cfg: DictConfig) -> PSSpec:
    return _spec(PSSpec, cfg.get("ps") or {}, "ps")


def gossip_spec(cfg: DictConfig) -> GossipSpec:
    return _spec(GossipSpec, cfg.get("gossip") or {}, "gossip")


def validate_paradigm(cfg: DictConfig) -> None:
    """Check `paradigm` and, for the non-federated ones, `distributed.*`, `ps.*` and `gossip.*`."""
    paradigm = paradigm_of(cfg)
    _require(paradigm in PARADIGMS, f"paradigm={paradigm} must be one of {', '.join(PARADIGMS)}")
    if paradigm == FEDERATED:
        return
    _require(cfg.runtime.name == "ray", f"paradigm={paradigm} runs on Ray actors: runtime={cfg.runtime.name}")
    d = distributed_spec(cfg)
    _positive_int(d.workers, "distributed.workers")
    _positive_int(d.batch_size, "distributed.batch_size")
    _positive_int(d.eval_samples, "distributed.eval_samples")
    _require(d.epochs > 0, f"distributed.epochs={d.epochs} must be > 0")
    _require(d.straggler_delay_s >= 0, f"distributed.straggler_delay_s={d.straggler_delay_s} must be >= 0")
    if d.straggler is not None:
        _require(
            isinstance(d.straggler, int) and 0 <= d.straggler < d.workers,
            f"distributed.straggler={d.straggler} must be a worker index in [0, {d.workers})",
        )
    if paradigm in ("ps_sync", "ps_async"):
        ps = ps_spec(cfg)
        _require(ps.combine in COMBINES, f"ps.combine={ps.combine} must be one of {', '.join(COMBINES)}")
        _positive_int(ps.keep_versions, "ps.keep_versions")
        _require(
            ps.stale_policy in STALE_POLICIES,
            f"ps.stale_policy={ps.stale_policy} must be one of {', '.join(STALE_POLICIES)}",
        )
        if ps.max_staleness is not None:
            _require(
                isinstance(ps.max_staleness, int) and ps.max_staleness >= 0,
                f"ps.max_staleness={ps.max_staleness} must be an integer >= 0 (or null: unbounded)",
            )
    if paradigm == "allreduce":
        _require(d.workers >= 2, f"paradigm=allreduce needs distributed.workers >= 2, got {d.workers}")
    if paradigm == "gossip":
        g = gossip_spec(cfg)
        _positive_int(g.nodes, "gossip.nodes")
        _positive_int(g.local_steps, "gossip.local_steps")
        _positive_int(g.node_test_limit, "gossip.node_test_limit")
        _require(g.nodes >= 2, f"gossip.nodes={g.nodes} must be >= 2")
        _require(
            g.topology in TOPOLOGIES, f"gossip.topology={g.topology} must be one of {', '.join(TOPOLOGIES)}"
        )
        _require(
            g.variant in GOSSIP_VARIANTS,
            f"gossip.variant={g.variant} must be one of {', '.join(GOSSIP_VARIANTS)}",
        )
        _require(
            d.workers <= g.nodes, f"distributed.workers={d.workers} > gossip.nodes={g.nodes}: idle hosts"
        )
        if g.topology == "random_regular":
            _require(
                0 < g.degree < g.nodes and g.nodes * g.degree % 2 == 0,
                f"gossip.degree={g.degree}: a random regular graph needs 0 < degree < gossip.nodes="
                f"{g.nodes} and nodes x degree even",
            )
