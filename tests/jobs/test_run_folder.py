"""One run per run folder: a finished run's folder is refused (unless resuming or overwrite=true), a live
run's folder is locked; only raypfl's own outputs count, not what Hydra writes first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raypfl.api import run as api_run
from raypfl.jobs.checkpoint import FILENAME
from raypfl.jobs.run_folder import (
    LOCK_FILE,
    RunFolderError,
    check_sweep_dir,
    claim,
    lock,
    pinned_run_dir,
    results_in,
    resumes_from,
)
from tests.conftest import REPO, SMALL_RUN, run_cli

B = [*SMALL_RUN, "train.rounds=1"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder (Hydra's `.hydra/` too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the rules, without a run -------------------------------------------------------------------------


def test_only_raypfls_results_make_a_folder_used(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "__main__.log").write_text("[10:00:00] starting\n")
    (tmp_path / "metrics.csv").write_text("round,test_acc\n")  # the header a run writes first
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "result.json").write_text(json.dumps({"status": "failed", "error": "bad input"}))
    assert results_in(tmp_path) == []  # Hydra's files, a header, a run that failed before any round
    (tmp_path / "metrics.csv").write_text("round,test_acc\n1,0.5\n")
    assert results_in(tmp_path) == ["metrics.csv"]
    (tmp_path / FILENAME).write_bytes(b"x")
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok"}))
    assert set(results_in(tmp_path)) == {"metrics.csv", FILENAME, "result.json"}


def test_claim_refuses_results_unless_resuming_there_or_overwriting(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="already holds a run's results \\(model.pt\\).*overwrite=true"):
        claim(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "model.pt"]
    with pytest.raises(RunFolderError, match="already holds"):  # resuming from ANOTHER run is no excuse
        claim(tmp_path, resume=tmp_path.parent / "other")
    claim(tmp_path, resume=tmp_path).release()
    claim(tmp_path, resume=tmp_path / FILENAME).release()  # the checkpoint file names its folder
    claim(tmp_path, overwrite="true").release()
    with pytest.raises(RunFolderError, match="overwrite=maybe must be true or false"):
        claim(tmp_path, overwrite="maybe")


def test_lock_is_exclusive_across_processes_and_released(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from raypfl.jobs.run_folder import lock
                lock({str(tmp_path)!r}); print("locked", flush=True); sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError) as err:
            lock(tmp_path)
        assert str(err.value) == f"run folder {tmp_path} is in use by another raypfl run (pid {holder.pid})"
    finally:
        holder.stdin.close()  # it exits: the kernel drops its lock
        holder.wait(timeout=30)
    with lock(tmp_path) as held:  # free again; re-entrant within one process
        assert lock(tmp_path) is held
    with lock(tmp_path):
        pass


def test_pinned_run_dir_and_resume_target(tmp_path):
    assert pinned_run_dir(["model=mlp", f"hydra.run.dir={tmp_path}"]) == tmp_path
    assert pinned_run_dir(["-m", f"hydra.run.dir={tmp_path}"]) is None  # a sweep: Hydra's job folders
    assert pinned_run_dir(["hydra.run.dir=out/${now:%H-%M-%S}"]) is None  # only Hydra can resolve it
    assert pinned_run_dir(["model=mlp"]) is None
    assert resumes_from(str(tmp_path), tmp_path) and not resumes_from(None, tmp_path)


def test_a_sweep_into_a_folder_whose_jobs_hold_results_is_refused(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)  # a job that did not get to a round
    sweep = ["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]
    check_sweep_dir(sweep)
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / "model.pt").write_bytes(b"x")
    with pytest.raises(
        RunFolderError, match=f"sweep folder {tmp_path} already holds runs' results \\(jobs 1\\)"
    ):
        check_sweep_dir(sweep)
    check_sweep_dir([*sweep, "overwrite=true"])
    check_sweep_dir(sweep[1:])  # not a sweep: its run folder is checked instead


# --- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> Path:
    """A finished run's folder (1 round): its results (model.pt, checkpoint, metrics, clients, result.json),
    written by the Python API, which runs the command line's config, checks and outputs in this process
    (a `python -m raypfl` process would cost ~4 s more; the tests below run the command line on it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    api_run(B, out_dir=out)
    assert results_in(out) and json.loads((out / "result.json").read_text())["status"] == "ok"
    return out


@pytest.mark.slow
def test_a_finished_runs_folder_is_refused_and_left_untouched(finished):
    before = snapshot(finished)
    proc = run_cli(*B, "seed=1", f"hydra.run.dir={finished}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: run folder {finished} already holds a run's results (model.pt, {FILENAME}, metrics.csv, "
        f"clients.csv, result.json); use another hydra.run.dir, resume={finished} to continue that run, "
        "or overwrite=true to replace them"
    ]
    after = snapshot(finished)
    assert after == before  # metrics, model, checkpoint and even Hydra's .hydra/ are as they were


@pytest.mark.slow
def test_a_folder_hydra_resolves_is_checked_in_the_job(finished, tmp_path):
    """`hydra.run.dir` with an interpolation is only known inside the job: refused there, before Ray,
    with the results kept."""
    shutil.copytree(finished, tmp_path / "1")
    metrics = (tmp_path / "1" / "metrics.csv").read_bytes()
    proc = run_cli(*B, "seed=1", f"hydra.run.dir={tmp_path}/${{seed}}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: run folder {tmp_path / '1'} already holds a run's results")
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "1" / "metrics.csv").read_bytes() == metrics
    assert json.loads((tmp_path / "1" / "result.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_resume_into_the_folder_and_overwrite_are_allowed(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    two_rounds = [a for a in B if not a.startswith("train.rounds")] + ["train.rounds=2"]
    proc = run_cli(*two_rounds, f"hydra.run.dir={run}", f"resume={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]
    proc = run_cli(*B, "seed=1", f"hydra.run.dir={run}", "overwrite=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # the new run's one round
    assert json.loads((run / "result.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_a_live_runs_folder_is_refused(tmp_path, data_root):
    """Two runs at once into one folder: the second gets one line and exit code 2, before Hydra or Ray."""
    with lock(tmp_path / "run"):  # this test process plays the live run
        proc = run_cli(*B, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: run folder {tmp_path / 'run'} is in use by another raypfl run (pid {os.getpid()})"
    ]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # not even .hydra/
