"""Every key's type and range is checked up front (issue 13, 2.6): one line naming the key, exit code 2,
before Ray starts. Also: unknown keys on the command line, and a run that never averaged an update."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from raypfl.cli import check_key_overrides
from raypfl.config import RAY_MIN_OBJECT_STORE_MB
from raypfl.driver.result import RunResult
from raypfl.errors import ConfigError, RunStopped
from raypfl.validation import validate
from tests.conftest import CONF_DIR, SMALL_RUN, make_config, run_cli

#: A device trace without its up_mbps column.
BAD_TRACE = Path(__file__).parent / "bad_trace.csv"

#: The issue's base command line: a small sequential run.
B = [*SMALL_RUN, "train.rounds=1"]
#: runtime.object_store_mb is a key of runtime=ray only
B_RAY = [o for o in B if o != "runtime=sequential"]

NOT_NUMBERS = [
    "optim.momentum",
    "optim.weight_decay",
    "faults.quorum",
    "runtime.torch_threads",
    "clients.speed_sigma",
    "partition.alpha",
    "algorithm.server_lr",
    "report.target_acc",
    "dataset.train_limit",
]
BAD = [
    *[(B + (["partition=dirichlet"] if key == "partition.alpha" else []), key, "abc") for key in NOT_NUMBERS],
    (B, "seed", "-1"),
    (B, "seed", "abc"),
    (B, "seed", "1.5"),
    (B, "clients.join_schedule", "abc"),
    (B, "clients.join_schedule", "[1,2]"),
    (B, "faults.max_retries", "1.5"),
    (B_RAY, "runtime.object_store_mb", "1"),
    (B_RAY, "runtime.object_store_mb", "74"),
    (B_RAY, "runtime.object_store_mb", "abc"),
    (B, "dataset.train_limit", "0"),  # was: silently trained on all 60,000 images
    (B, "dataset.train_limit", "-5"),
    (B, "dataset.test_limit", "0"),
    (B, "optim.lr", "inf"),
    (B, "optim.lr", "nan"),
    (B, "optim.lr", "true"),  # a bool is not a number
    (B, "faults.actor_timeout_s", "-1"),
    (B, "train.rounds", "false"),
    (B, "train.batch_size", "2.0"),
    (B, "runtime.vectorize", "1"),
    (B, "faults.round_timeout_s", "inf"),
    (B, "faults.kill_count", "1.5"),
    (B, "clients.speed", "7"),
    (B, "optim.name", "null"),
    (B, "logger.name", "abc"),
    (B, "dataset.download", "maybe"),
    (B, "dataset.root", "[a]"),
    (B + ["partition=shards"], "partition.k", "0"),
    (B, "distributed.workers", "0"),  # checked whatever the paradigm
    (B, "distributed.epochs", "-inf"),
    (B, "ps.max_staleness", "-1"),
    (B, "ps.combine", "max"),
    (B, "gossip.nodes", "1"),
    (B, "gossip.topology", "star"),
    (B, "partition.client_test_fraction", "0"),  # a held-out fraction is in (0, 1)
    (B, "partition.client_test_fraction", "1"),
    (B, "partition.client_test_fraction", "1.5"),
    (B, "partition.client_test_fraction", "abc"),
    (B, "train.eval_clients_every", "-1"),
    (B, "clients.partial_work_fraction", "1.5"),
    (B, "clients.partial_work_policy", "sometimes"),
    (B, "clients.over_select", "0.9"),  # the virtual clock (issue 17)
    (B, "clock.name", "fast"),
    (B, "clock.compute_sps", "-1"),
    (B, "clock.bandwidth_sigma", "-0.5"),
    (B + ["algorithm=fedbuff"], "algorithm.buffer_size", "30"),  # > algorithm.concurrency=20
    (B + ["algorithm=fedbuff"], "algorithm.staleness", "linear"),
]


@pytest.mark.parametrize(("base", "key", "value"), BAD, ids=[f"{k}={v}" for _, k, v in BAD])
def test_bad_value_is_one_line_naming_the_key(base, key, value):
    with pytest.raises(ConfigError) as err:
        validate(make_config(*base, f"{key}={value}"))
    message = str(err.value)
    assert message.startswith(f"{key}="), message
    assert " must " in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "dataset.train_limit=0",
            "dataset.train_limit=0 must be an integer >= 1 (or null: all training images)",
        ),
        ("optim.lr=true", "optim.lr=true must be a finite number > 0"),
        ("optim.lr=inf", "optim.lr=inf must be a finite number > 0"),
        ("optim.momentum=1", "optim.momentum=1 must be in [0, 1)"),
        ("seed=1.5", "seed=1.5 must be an integer >= 0"),
        ("faults.actor_timeout_s=-1", "faults.actor_timeout_s=-1 must be > 0"),
        (
            "clients.join_schedule=[1,2]",
            "clients.join_schedule=[1, 2] must be a mapping {round: clients joining",
        ),
        ("optim.name=lbfgs", "optim.name=lbfgs must be one of sgd, adam"),
    ],
)
def test_message_says_what_is_expected(override, expected):
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        validate(make_config(*B, override))


def test_object_store_minimum_is_rays():
    from ray._private.ray_constants import OBJECT_STORE_MINIMUM_MEMORY_BYTES

    assert RAY_MIN_OBJECT_STORE_MB * 1024 * 1024 == OBJECT_STORE_MINIMUM_MEMORY_BYTES
    validate(make_config(*B_RAY, f"runtime.object_store_mb={RAY_MIN_OBJECT_STORE_MB}"))
    with pytest.raises(ConfigError, match=r"runtime\.object_store_mb=1 must be an integer \(MB\) >= 75"):
        validate(make_config(*B_RAY, "runtime.object_store_mb=1"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["dataset.train_limit=null", "dataset.test_limit=null"],  # null: all images
        ["optim.lr=1", "optim.momentum=0", "report.target_acc=1"],  # integers are numbers
        ["seed=12345678901234567890", "faults.round_timeout_s=null", "runtime.torch_threads=2"],
        ["clients.join_schedule={1: 2, 3: 4}"],
        ["partition=quantity_skew", "partition.min_size=10", "partition.max_size=50"],
    ],
)
def test_good_values_pass(overrides):
    validate(make_config(*B, *overrides))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_validates(name):
    validate(make_config(f"+experiment={name}"))


def test_unknown_top_level_key_is_refused():
    with pytest.raises(ConfigError, match="^unknown key foo "):
        validate(make_config(*B, "+foo=1"))
    with pytest.raises(ConfigError, match=r"^unknown key partition\.alpha for partition=iid"):
        validate(make_config(*B, "+partition.alpha=0.5"))
    with pytest.raises(ConfigError, match=r"^unknown key algorithm\.mu"):
        validate(make_config(*B, "+algorithm.mu=0.1"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["foo=1"], "foo=1: unknown key foo"),
        (["optim.lrr=0.1"], "optim.lrr=0.1: unknown key optim.lrr (did you mean optim.lr?)"),
        (["~faults.quorm"], "~faults.quorm: unknown key faults.quorm (did you mean faults.quorum?)"),
        (
            ["partition.alpha=1"],
            "partition.alpha=1: unknown key partition.alpha "
            "(partition=iid has: name, client_test_fraction, _target_)",
        ),
        (["runtime.object_store_mb=100"], "unknown key runtime.object_store_mb (runtime=sequential has:"),
    ],
)
def test_unknown_key_on_the_command_line(args, expected):
    assert expected in check_key_overrides(B + args)


@pytest.mark.parametrize(
    "args",
    [
        ["optim.lr=0.1", "+optim.extra=1", "hydra.run.dir=x", "dataset.root=/tmp"],  # + and hydra.*: not ours
        ["partition=dirichlet", "partition.alpha=0.1"],  # the group choice comes first
        ["partition.alpha=0.1", "partition=dirichlet"],  # ... or after
        ["-m", "optim.lr=0.1,0.2", "seed=0,1"],  # sweeps
        ["-m", "partition=iid,dirichlet", "partition.alpha=0.1"],  # the key of one swept choice
        ["-m", "+experiment=tune_fedavg", "hydra/launcher=ray"],
        ["--cfg", "job", "foo=1"],  # other flags: left to Hydra
    ],
)
def test_known_keys_and_sweeps_pass_the_key_check(args):
    assert check_key_overrides(B + args) is None


def _result(clients: list[int], weights: np.ndarray | None = None) -> RunResult:
    rows = [{"round": i + 1, "test_acc": 0.1, "clients": n} for i, n in enumerate(clients)]
    return RunResult(np.zeros(4, np.float32) if weights is None else weights, rows, CONF_DIR)


def test_a_run_that_never_averaged_an_update_is_not_a_success():
    _result([0, 3, 0]).check_trained()
    with pytest.raises(RunStopped, match="no client update was averaged into the global model in 3 rounds"):
        _result([0, 0, 0]).check_trained()
    with pytest.raises(RunStopped, match="NaN/Inf weights"):
        _result([2], np.array([0.0, np.nan], np.float32)).check_trained()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("foo=1", "error: foo=1: unknown key foo"),
        ("dataset.train_limit=0", "error: dataset.train_limit=0 must be an integer >= 1"),
        ("clip.bound=0", "error: clip.bound=0 must be > 0"),  # the update pipeline (test_updates.py)
        (  # a device trace missing a column (tests/clock/test_clock.py has the other bad traces)
            f"clock.trace={BAD_TRACE}",
            f"error: clock.trace={BAD_TRACE}: missing column(s) up_mbps",
        ),
    ],
)
def test_command_line_exits_2_with_one_line(arg, expected, tmp_path):
    proc = run_cli(*B, arg, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.csv").exists()  # failed before the run started
