"""What a paradigm gets (a `ParadigmContext`) and what it gives back (`Point`s to evaluate, time rows).

A paradigm is a generator `train(ctx)` that yields `Point`s, the models to evaluate with how many samples
had been processed and when, and appends per-iteration time rows (compute / communication / apply) to
`ctx.breakdown`. The run loop (`raypfl.paradigms.run`) evaluates, logs and plots; a paradigm never does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from raypfl.config import OptimSpec
from raypfl.data.datasets import Dataset
from raypfl.data.partitions import Partition
from raypfl.paradigms.spec import DistributedSpec, GossipSpec, PSSpec

#: How often the driver looks for new points while the actors train (seconds).
POLL_S = 0.5


@dataclass
class Point:
    """A model to evaluate: after `samples` samples processed, at `time` (epoch s), `iteration` steps."""

    samples: int
    iteration: int
    time: float
    weights: np.ndarray
    train_loss: float = float("nan")
    extra: dict = field(default_factory=dict)  # paradigm-specific columns (staleness, consensus, ...)


@dataclass
class ParadigmContext:
    """Everything a paradigm needs: data (and its object-store ref), shards, model, optimizer, budget."""

    name: str
    dataset: Dataset | None  # None in the copy sent to actors (they read `dataset_ref`)
    dataset_ref: object  # ray.put(dataset): actors read it zero-copy
    partition: Partition  # one shard per worker (ps, allreduce) or per node (gossip)
    model_name: str
    weights: np.ndarray  # the initial model (the same as FedAvg's round 0 for this seed)
    optim: OptimSpec
    dist: DistributedSpec
    ps: PSSpec
    gossip: GossipSpec
    seed: int
    torch_threads: int = 1
    extra_columns: list[str] = field(default_factory=list)
    breakdown: list[dict] = field(default_factory=list)  # iteration, worker, compute_s, comm_s, apply_s
    summary: dict = field(default_factory=dict)  # end-of-run facts (staleness stats, replica check, ...)
    tables: dict[str, list[dict]] = field(default_factory=dict)  # more CSV files: name -> rows

    def for_workers(self) -> ParadigmContext:
        """A copy to send to actors: without the dataset (they get it from the object store) or results."""
        return replace(self, dataset=None, dataset_ref=None, breakdown=[], summary={}, tables={})

    @property
    def total_samples(self) -> int:
        return self.dist.total_samples(len(self.dataset.train_y))

    def delay(self, worker: int) -> float:
        return self.dist.straggler_delay_s if self.dist.straggler == worker else 0.0


def points_while(running: list, take: Callable[[], list[Point]]) -> Iterator[Point]:
    """Yield the points `take()` returns while the ObjectRefs in `running` (the workers' loops) finish.

    A worker that failed raises at once, not after the others: they may be waiting for it (a barrier).
    """
    import ray

    pending = list(running)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        ray.get(done)
        yield from take()
    yield from take()
