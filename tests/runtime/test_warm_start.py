"""Warm start: the driver trains rounds while the actor pool boots, then hands the model over."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from raypfl.config import clients_spec, faults_spec
from raypfl.data.load import load_data
from raypfl.driver.experiment import build_setup, initial_snapshot
from raypfl.driver.planning import RoundPlanner
from raypfl.runtime.sequential import SequentialRuntime
from raypfl.runtime.warm import WarmStart
from tests.conftest import TINY, make_config


class SlowPool(SequentialRuntime):
    """A stand-in for the Ray pool: ready once released; records where it was launched and what it trained."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.rounds: list[int] = []
        self.launched_in: str | None = None

    def expected_parallelism(self) -> int:
        return 2

    def launch(self, setup, initial):
        self.launched_in = threading.current_thread().name
        self._args = (setup, initial)

    def ready(self) -> bool:
        return self.release.is_set()

    def wait_ready(self) -> None:
        super().start(*self._args)

    def take_over(self, snapshot):
        self.server.reset(snapshot.broadcast, snapshot.version, snapshot.state)

    def run_round(self, plan, on_submitted=None):
        self.rounds.append(plan.round_idx)
        return super().run_round(plan, on_submitted)


def _rounds(runtime, cfg, n, release_after=None):
    planner = RoundPlanner(clients_spec(cfg), faults_spec(cfg), cfg.seed, 1)
    for round_idx in range(1, n + 1):
        runtime.run_round(planner.plan(round_idx))
        if round_idx == release_after:
            runtime.pool.release.set()
    return runtime.global_weights()


def test_driver_trains_until_the_pool_is_ready_then_hands_over(data_root):
    cfg = make_config(*TINY, "runtime=sequential", "train.rounds=4")
    setup = build_setup(cfg, load_data(cfg))
    weights = initial_snapshot(setup, cfg.model.name, cfg.seed)
    reference = SequentialRuntime()
    reference.start(setup, weights)
    expected = _rounds(reference, cfg, 4)

    warm = WarmStart(SlowPool())
    warm.start(setup, weights)
    assert warm.parallelism == 2  # the pool's size, known before it exists
    got = _rounds(warm, cfg, 4, release_after=2)
    assert warm.version == 4
    warm.close()
    assert warm.pool.launched_in == threading.main_thread().name  # Ray must start in the main thread
    assert warm.local_rounds == 2 and warm.pool.rounds == [3, 4]
    assert np.abs(got - expected).max() <= 1e-6


def test_a_pool_that_fails_to_start_is_reported(data_root):
    class BrokenPool(SlowPool):
        def launch(self, setup, initial):
            raise OSError("no Ray here")

    cfg = make_config(*TINY, "runtime=sequential")
    setup = build_setup(cfg, load_data(cfg))
    warm = WarmStart(BrokenPool())
    warm.start(setup, initial_snapshot(setup, cfg.model.name, cfg.seed))
    planner = RoundPlanner(clients_spec(cfg), faults_spec(cfg), cfg.seed, 1)
    with pytest.raises(OSError, match="no Ray here"):
        warm.run_round(planner.plan(1))


def test_round_one_is_evaluated_while_ray_starts(data_root):
    """Round 1's evaluation happens beside the launch; the driver later collects it, timestamped."""
    cfg = make_config(*TINY, "runtime=sequential")
    setup = build_setup(cfg, load_data(cfg))
    weights = initial_snapshot(setup, cfg.model.name, cfg.seed)
    reference = SequentialRuntime()
    reference.start(setup, weights)
    planner = RoundPlanner(clients_spec(cfg), faults_spec(cfg), cfg.seed, 1)
    reference.run_round(planner.plan(1))
    warm = WarmStart(SlowPool())
    warm.start(setup, weights)
    warm.run_round(planner.plan(1))
    early = warm.evaluate_async()()
    assert early.finished is not None  # computed in the helper thread, before it was collected
    assert early.accuracy == reference.evaluate().accuracy
    assert warm.evaluate_async()().finished is None  # used once: later evaluations are fresh
    warm.close()
