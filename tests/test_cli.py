"""The command line: bad input exits with code 2 and one line naming the key, before Ray starts."""

from __future__ import annotations

import pytest

from raypfl.driver.experiment import run_experiment
from raypfl.errors import DataError
from tests.conftest import make_config, run_cli


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["clients.per_round=120", "clients.num=100"], "error: clients.per_round=120 > clients.num=100"),
        (["optim.lr=0"], "error: optim.lr=0 must be > 0"),
        (["model=resnet999"], "error: unknown model=resnet999"),
        (["partition=zipf"], "error: unknown partition=zipf"),
        (["partition=dirichlet", "partition.alpha=0"], "error: partition.alpha=0 must be > 0"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, expected, tmp_path):
    proc = run_cli("+experiment=fedavg", *args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ray runtime" not in proc.stderr + proc.stdout  # failed before Ray started


def test_missing_dataset_says_where_it_looked(tmp_path):
    # in-process: the command line prints this DataError in one line and exits 2 (the test below)
    empty = tmp_path / "nodata"
    cfg = make_config("+experiment=fedavg", f"dataset.root={empty}", "dataset.download=false")
    with pytest.raises(DataError) as err:
        run_experiment(cfg, tmp_path / "run")
    assert f"mnist not found in {empty}/MNIST (dataset.download=false)" in str(err.value)
    assert "RAYPFL_DATA" in str(err.value)


@pytest.mark.slow
def test_missing_dataset_and_no_network_fails_without_hanging(tmp_path):
    """Download is attempted through a dead proxy (no network) and fails with the same one-liner."""
    empty = tmp_path / "nodata"
    dead_proxy = "http://127.0.0.1:9"
    proc = run_cli(
        "+experiment=fedavg",
        "runtime=sequential",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"RAYPFL_DATA": str(empty), "http_proxy": dead_proxy, "https_proxy": dead_proxy},
    )
    assert proc.returncode == 2
    assert f"mnist not found in {empty}/MNIST (download failed" in proc.stderr
    assert "RAYPFL_DATA" in proc.stderr and "Traceback" not in proc.stderr
