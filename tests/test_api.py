"""The Python API: the command line's config, checks and outputs, with the RunResult handed back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raypfl.api import compose, run
from raypfl.driver.experiment import run_experiment
from raypfl.errors import ConfigError
from raypfl.jobs.run_folder import RunFolderError
from tests.conftest import SMALL_RUN, make_config

RUN = [*SMALL_RUN, "train.rounds=2", "algorithm=fedadam"]


@pytest.mark.slow
def test_run_returns_the_result_of_the_command_lines_config(tmp_path, data_root):
    result = run(RUN, out_dir=tmp_path / "api")
    assert [row["round"] for row in result.rounds] == [1, 2] and 0 < result.final_accuracy <= 1
    assert result.server.state["t"] == 2  # the server state of the final version comes back too
    assert json.loads((tmp_path / "api" / "result.json").read_text())["status"] == "ok"
    same = run_experiment(make_config(*RUN), tmp_path / "direct")
    np.testing.assert_array_equal(result.weights, same.weights)
    with pytest.raises(RunFolderError, match="results"):  # a finished run's folder is not overwritten
        run(RUN, out_dir=tmp_path / "api")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm=fedadam", "algorithm.beta1=2"], "algorithm.beta1=2 must be in"),
        (["model.nme=mlp"], "unknown key model.nme"),
        (["algorithm=fedsgd"], "unknown algorithm=fedsgd"),
        (["runtime=mpi"], None),
    ],
)
def test_bad_overrides_raise_config_errors(overrides, message):
    if message is None:  # composes fine, but MPI runs start under mpiexec
        with pytest.raises(ConfigError, match="mpiexec"):
            run([*SMALL_RUN, *overrides])
        return
    with pytest.raises(ConfigError, match=message):
        compose(overrides)
