"""The three classic fault experiments write their tables and plots (tiny versions of each)."""

from __future__ import annotations

import csv

from raypfl.tracking.fault_tables import write_tables
from tests.test_cli import run_cli

TINY_DATA = ["dataset.train_limit=2000", "dataset.test_limit=500", "model=mlp"]


def read(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_fault_dynamic_writes_its_table(tmp_path, data_root, ray_address):
    proc = run_cli(
        "+experiment=fault_dynamic",
        *TINY_DATA,
        "clients.num=6",
        "clients.per_round=6",
        "clients.join_schedule={1: 2, 2: 2, 3: 2}",
        "partition.max_size=300",
        "train.rounds=3",
        f"runtime.address={ray_address}",  # the session's Ray (2 CPUs), not one more Ray
        "runtime.num_actors=1",  # the table is the same on any pool; each actor process costs seconds
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = read(tmp_path / "fault_dynamic.csv")
    assert [int(r["selected"]) for r in table] == [2, 4, 6]  # workers joined over the rounds
    assert all(int(r["answered"]) >= 0.75 * int(r["selected"]) for r in table)
    assert all(0 < float(r["global_acc"]) <= 1 and 0 < float(r["mean_local_acc"]) <= 1 for r in table)
    assert "| round | selected |" in (tmp_path / "fault_dynamic.md").read_text()
    assert (tmp_path / "fault_dynamic.png").stat().st_size > 10_000


def test_fault_kill_finds_where_quorum_fails(fault_kill_sweep):
    tmp_path, proc = fault_kill_sweep  # 4 clients on 2 actors, 3 rounds, faults.kill_count=0,1
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {int(r["killed"]): r for r in read(tmp_path / "fault_kill.csv")}
    assert table[0]["quorum_at_kill"] == "yes" and int(table[0]["answered_at_kill"]) >= 3  # closes at 3 of 4
    # 1 of 2 actors killed with its 2 clients: 2 answers < ceil(0.75 x 4) = 3, no quorum; the dead are evicted
    assert table[1]["quorum_at_kill"] == "NO" and table[1]["answered_at_kill"] == "2"
    assert table[1]["workers_after"] == "2"
    assert (tmp_path / "fault_kill.png").stat().st_size > 10_000


def test_fault_scaling_table_from_job_folders(tmp_path):
    for job, (workers, acc) in enumerate([(1, 0.97), (2, 0.96), (4, 0.93)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(
            f"- +experiment=fault_scaling\n- clients.num={workers}\n"
        )
        columns = ["round", "test_acc", "local_acc", "round_s", "train_s"]
        with (folder / "metrics.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([[1, acc - 0.1, acc - 0.2, 4.0, 3.0], [2, acc, acc - 0.1, 2.0, 1.5]])
    table = write_tables("scaling", tmp_path)
    assert [r["workers"] for r in table] == [1, 2, 4]
    assert [r["images_per_worker"] for r in table] == [40000, 20000, 10000]
    assert [r["global_acc"] for r in table] == [0.97, 0.96, 0.93] and table[0]["median_round_s"] == 3.0
    assert (tmp_path / "fault_scaling.png").exists() and (tmp_path / "fault_scaling.md").exists()


def test_sequential_sweep_shares_one_local_ray(fault_kill_sweep):
    """The fault_kill sweep (conftest; here, beside its other user, so that one xdist process runs it once):
    two runtime=ray jobs on the basic launcher.

    The sweep's SharedRay callback starts (here: connects to) Ray once; each job then finds it running.
    """
    _, proc = fault_kill_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    nodes = re.findall(
        r"Ray (started for this run|already running) \((?:driver on )?node (\w+)", proc.stdout + proc.stderr
    )
    assert [n[0] for n in nodes] == ["already running", "already running"]  # started once, by the sweep
    assert nodes[0][1] == nodes[1][1]
