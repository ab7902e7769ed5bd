"""Distributed training beyond FedAvg, on Ray: parameter-server SGD (sync, async), all-reduce, gossip.

Each paradigm is a generator `train(ctx) -> Iterator[Point]` in its own module; `raypfl.paradigms.run`
evaluates the points, logs, and writes the CSV files and plots. `paradigm=federated` (the default) is the
FedAvg machinery of `raypfl.driver.experiment`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

#: paradigm -> "module:function" (imported when used: they import Ray)
TRAINERS = {
    "ps_sync": "raypfl.paradigms.ps:train_sync",
    "ps_async": "raypfl.paradigms.ps:train_async",
    "allreduce": "raypfl.paradigms.allreduce:train",
    "gossip": "raypfl.paradigms.gossip:train",
}

#: Extra metrics.csv columns of each paradigm (besides samples, epoch, accuracy, loss, wall time).
COLUMNS = {
    "ps_sync": ["version"],
    "ps_async": ["version", "staleness_mean", "dropped"],
    "allreduce": [],
    "gossip": ["consensus", "node_acc_mean", "node_acc_min", "node_acc_max"],
}


def trainer(name: str) -> Callable:
    module, function = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), function)
