"""FedBuff's policy (raypfl.driver.stream) on a fake stream, its staleness functions, and the server's
staleness-scaled buffer: no training."""

from __future__ import annotations

import numpy as np
import pytest

from raypfl.algorithms.aggregate import MODEL, Aggregate, ClientUpdate
from raypfl.algorithms.fedbuff import FedBuff
from raypfl.driver.stream import BufferedRounds
from raypfl.errors import ConfigError, RunStopped
from raypfl.runtime.parameter_server import ParameterServer


class FakeStream:
    """Records what the policy asks for; every update is `ones * client`; K folds make a server step."""

    def __init__(self):
        self.version = 0
        self.dispatched: list[tuple[int, int, int]] = []  # (client, key, version)
        self.folds: list[tuple[int, float, int]] = []  # (client, scale, version folded into)
        self.size = 0
        self.count = 0
        self.held: dict[int, dict] = {}

    def hold(self, version, broadcast):
        self.held[version] = broadcast

    def broadcast(self, version):
        return {MODEL: np.full(2, float(version), np.float32)}

    def dispatch(self, client, key, version, state):
        self.dispatched.append((client, key, version))
        return (client, key)

    def first_done(self, handles):
        return min(handles, key=lambda h: h[1])

    def receive(self, handle):
        row = {"client": handle[0], "status": "ok", "accepted": True, "seconds": 0.0, "actor": 0}
        return row, None

    def results(self, handles):
        return [self.receive(handle) for handle in handles]

    def open(self, size):
        self.size, self.count = size, 0

    def fold(self, handle, scale):
        self.folds.append((handle[0], scale, self.version))
        self.count += 1
        if self.count == self.size:
            self.version += 1
            return True
        return False

    def step_summary(self):
        return self.version

    def summary(self, handle):
        return {"clients": [], "rejected": [], "aggregate_s": 0.0, "version": handle}

    def release(self, keep):
        pass


def _stream(num=30, concurrency=6, buffer_size=3, duration=lambda c: 1.0 + (c % 7)):
    algorithm = FedBuff(concurrency=concurrency, buffer_size=buffer_size, staleness="polynomial")
    fake = FakeStream()
    return BufferedRounds(algorithm, fake, num, seed=0, states={}, duration=duration), fake


def test_concurrency_buffer_and_staleness():
    rounds, fake = _stream()
    rounds.start()
    assert len(rounds.flights) == 6 and len({f.client for f in rounds.flights}) == 6
    assert fake.dispatched == []  # on the virtual clock work is handed to a worker when it is folded
    finishes = []
    for r in range(1, 6):
        plan, result, columns = rounds.resolve(rounds.step(r))
        assert len(plan.cohort) == 3 and len(rounds.flights) == 6  # a new client per update received
        assert len({f.client for f in rounds.flights}) == 6  # never the same client twice in flight
        rows = result.client_metrics
        for row in rows:
            weight = (1 + row["staleness"]) ** -0.5
            assert (row["client"], pytest.approx(weight), row["base_version"] + row["staleness"]) in [
                (c, s, v) for c, s, v in fake.folds
            ]
        finishes.append(columns["virtual_s"])
    assert finishes == sorted(finishes)  # events in virtual-time order
    assert [c for c, _, _ in fake.dispatched] == [c for c, _, _ in fake.folds]  # handed over as folded
    assert max(row for _, _, row in fake.folds) == 4 and fake.version == 5
    # updates dispatched before a step arrive after it: staleness > 0 appears
    assert any(scale < 1 for _, scale, _ in fake.folds)


def test_same_seed_same_stream_and_resume_continues_it():
    a, fake_a = _stream()
    a.start()
    for r in range(1, 4):
        record = a.step(r)
    saved = a.state_dict(record)
    for r in range(4, 7):
        a.step(r)
    b, fake_b = _stream()
    fake_b.version = 3
    b.load_state_dict(saved)
    assert [f.record() for f in b.flights] == saved["flights"]  # the same flights, dispatched again
    for r in range(4, 7):
        b.step(r)
    assert fake_b.folds == fake_a.folds[-len(fake_b.folds) :]
    assert b.now == a.now and b.key == a.key


def test_real_clock_takes_whichever_answers_first():
    rounds, fake = _stream(duration=None)
    rounds.start()
    plan, _, columns = rounds.resolve(rounds.step(1))
    assert [c for c, _, _ in fake.folds] == [c for c, _, _ in fake.dispatched[:3]]  # FIFO fake
    assert "virtual_s" not in columns


def test_a_step_whose_updates_all_failed_stops_the_run():
    rounds, fake = _stream()
    fake.receive = lambda handle: (
        {"client": handle[0], "status": "failed", "seconds": 0.0, "actor": 0},
        None,
    )
    rounds.start()
    with pytest.raises(RunStopped, match="^round 1: every client update of this server step failed"):
        rounds.resolve(rounds.step(1))


@pytest.mark.parametrize(
    ("kind", "weights"),
    [
        ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("polynomial", [1.0, 2**-0.5, 3**-0.5, 0.5, 1 / np.sqrt(10)]),  # (1 + s)^-a, a = 1/2
        ("hinge", [1.0, 1.0, 1.0, 1 / (0.5 * 1 + 1), 1 / (0.5 * 7 + 1)]),  # 1 up to b = 2, then 1/(a(s-b)+1)
    ],
)
def test_staleness_functions(kind, weights):
    algorithm = FedBuff(staleness=kind, staleness_a=0.5, staleness_b=2)
    assert [algorithm.staleness_weight(s) for s in (0, 1, 2, 3, 9)] == pytest.approx(weights)


def test_buffer_size_above_concurrency_is_refused():
    with pytest.raises(ConfigError, match=r"^algorithm.buffer_size=30 must be <= algorithm.concurrency=20"):
        FedBuff(concurrency=20, buffer_size=30).check()


def test_server_step_is_the_staleness_weighted_mean_over_the_buffer():
    """w <- w + lr (1/K) sum_i s_i delta_i (FedBuff's Algorithm 1, uniform weights)."""
    algorithm = FedBuff(server_lr=0.5, buffer_size=2)
    server = ParameterServer({MODEL: np.zeros(3, np.float32)}, algorithm.server_update)
    server.expect(0, 2, 2)
    deltas = {1: np.array([1.0, 2.0, 3.0], np.float32), 2: np.array([4.0, 0.0, -2.0], np.float32)}
    scales = {1: 1.0, 2: 0.25}
    for client, delta in deltas.items():
        partial = Aggregate()
        partial.add(ClientUpdate(client, {MODEL: delta}, {MODEL: 1.0}))
        server.push(0, partial, None, scales[client])
    expected = 0.5 * (deltas[1] * 1.0 + deltas[2] * 0.25) / 2
    assert np.allclose(server.pull_latest()[1][MODEL], expected) and server.latest == 1


def test_sequential_stream_holds_a_version_until_released(data_root):
    """A flight handed over many steps after its base version was made still finds it (the parameter
    server keeps only two versions)."""
    from raypfl.data.load import load_data
    from raypfl.driver.experiment import build_setup, initial_snapshot
    from raypfl.runtime.sequential import SequentialRuntime
    from tests.conftest import TINY, make_config

    cfg = make_config(*TINY, "runtime=sequential", "algorithm=fedbuff", "algorithm.buffer_size=1")
    setup = build_setup(cfg, load_data(cfg))
    runtime = SequentialRuntime()
    runtime.start(setup, initial_snapshot(setup, setup.model, 0))
    stream = runtime.stream()
    for key in range(1, 5):  # four server steps of one update each, each from the latest version
        stream.open(1)
        assert stream.fold(stream.dispatch(0, key, stream.version, None), 1.0)
    stream.open(1)
    old = stream.dispatch(1, 9, 2, None)  # version 2: no client trained from it yet; the server has 3, 4
    assert stream.fold(old, 1.0) and stream.version == 5
    stream.release({2})
    assert set(stream.held) == {2, 5}
