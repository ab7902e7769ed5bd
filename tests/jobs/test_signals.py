"""Ctrl-C and SIGTERM end a run in one line with `result.json` status `interrupted` and a resume hint
(exit codes 130 / 143); the final model survives an interrupt after the last round; no Ray process
outlives the run by more than a few seconds, not even after the driver is SIGKILLed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from raypfl.driver.experiment import run_experiment
from raypfl.jobs import interrupts
from raypfl.jobs.checkpoint import FILENAME, load_checkpoint
from raypfl.jobs.interrupts import RunInterrupted
from raypfl.jobs.watchdog import survivors
from raypfl.tracking.tracker import RunTracker
from tests.conftest import REPO, SMALL_RUN, make_config

B = SMALL_RUN
MANY = "train.rounds=5000"  # far more rounds than a test waits for
OWN_RAY = ["runtime=ray", "runtime.num_cpus=1", "runtime.object_store_mb=100"]


class Run:
    """`python -m raypfl ARGS` in the background, its output lines collected as they come."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raypfl", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=os.environ.copy(),
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._seen = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._seen:
                lines.append(line)
                self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        """The first output line matching `pattern` (waiting for it; the test fails without it)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                found = next(filter(None, map(regex.search, self.stdout + self.stderr)), None)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._readers_alive():
                    self.kill()
                    pytest.fail(
                        f"no line matching {pattern!r}:\n{''.join(self.stdout + self.stderr)[-3000:]}"
                    )
                self._seen.wait(min(left, 0.5))

    def _readers_alive(self) -> bool:
        return any(r.is_alive() for r in self._readers)

    def track_descendants(self) -> dict[int, psutil.Process]:
        """Every process descended from the run while it lives (polled; filled in by a thread)."""
        seen: dict[int, psutil.Process] = {}

        def poll() -> None:
            while self.proc.poll() is None:
                try:
                    for child in psutil.Process(self.proc.pid).children(recursive=True):
                        seen.setdefault(child.pid, child)
                except psutil.Error:
                    pass
                time.sleep(0.2)

        threading.Thread(target=poll, daemon=True).start()
        return seen

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return code, "".join(self.stdout), "".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def outlivers(procs: list[psutil.Process], within: float) -> list[str]:
    """The processes of `procs` still running `within` seconds from now (killed then: they are ours)."""
    left = []
    for proc in survivors(procs, within, poll_s=0.2):
        try:
            left.append(" ".join(proc.cmdline())[:120] or proc.name())
            proc.kill()
        except psutil.Error:
            pass
    return left


def assert_one_line(stderr: str, signame: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and "received at time" not in stderr, stderr[-3000:]  # no C++ dump
    assert len(lines) == 1 and lines[0].startswith(f"interrupted by {signame}"), stderr[-3000:]
    return lines[0]


@pytest.fixture
def handlers(monkeypatch):
    """raypfl's SIGINT/SIGTERM handlers in this process for one test (pytest's are put back after)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(interrupts, "_received", 0)
    monkeypatch.setattr(interrupts, "_installed", False)
    interrupts.install()
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_a_signal_while_ray_starts_waits_and_a_second_one_is_ignored(handlers):
    finished = False
    with pytest.raises(RunInterrupted) as err, interrupts.deferred():  # as around ray.init
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here and holds the signal
        finished = True
    assert finished and err.value.signum == signal.SIGTERM and err.value.exit_code == 143
    os.kill(os.getpid(), signal.SIGINT)  # the run is stopping: ignored
    time.sleep(0.2)
    with pytest.raises(RunInterrupted) as err:  # a third one forces
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
    assert err.value.signum == signal.SIGINT and err.value.exit_code == 130


def test_an_error_raised_while_an_interrupt_unwinds_is_the_interrupt():
    """torch.save cut by a KeyboardInterrupt raises `RuntimeError: ... unexpected pos`: an interrupt."""
    try:
        try:
            raise RunInterrupted(signal.SIGTERM)
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3328 vs 3222")  # noqa: B904
    except RuntimeError as exc:
        assert interrupts.interrupt_in(exc).signum == signal.SIGTERM
    assert interrupts.interrupt_in(ValueError("x")) is None


# --- sequential runs: the exit code, the line, result.json, the hint ---------------------------------


def interrupt(run: Run, signum: int, code: int, out) -> tuple[int, list[str]]:
    """Signal `run` (a `python -m raypfl` run into `out`), check how it ended: its exit code, one line
    saying which checkpoint to resume from and how, and result.json. Returns (the round of the
    checkpoint, the resume command of the line)."""
    run.signal(signum)
    returncode, _, stderr = run.finish()
    name = signal.Signals(signum).name
    assert returncode == code, stderr[-3000:]
    line = assert_one_line(stderr, name)
    saved = load_checkpoint(out)["round"]
    assert f"checkpoint after round {saved}/5000 in {out}; resume with: python -m raypfl " in line
    assert line.endswith(f"hydra.run.dir={out} resume={out}")
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["signal"] == name
    assert result["round"] == saved
    return saved, shlex.split(line.split("resume with: ", 1)[1])


@pytest.mark.slow
def test_an_interrupted_run_says_how_to_resume(tmp_path, data_root):
    """SIGTERM (143), then SIGINT (130) to the run that the first one's hint started: each ends in one line
    with its checkpoint and the command that resumes it, and the hint works: that command, as it is,
    continues the run in its folder from the checkpoint.

    One run per signal, plus a resumed run for the hint, would start three `python -m raypfl` processes;
    here the resumed run is the one Ctrl-C interrupts (the signal handling is the same: a run started
    with `resume=` is interrupted like any other)."""
    out = tmp_path / "run"
    first = Run(*B, MANY, f"hydra.run.dir={out}")
    first.wait_for(r"round +2/")
    saved, command = interrupt(first, signal.SIGTERM, 143, out)
    assert command[:3] == ["python", "-m", "raypfl"] and MANY in command
    resumed = Run(*command[3:])  # the hint as it is (5000 rounds): it goes on in the folder
    resumed.wait_for(rf"round +{saved + 2}/5000")
    again, _ = interrupt(resumed, signal.SIGINT, 130, out)
    assert again > saved  # the resumed run saved rounds of its own
    went_on = [int(n) for n in re.findall(r"round +(\d+)/5000", "".join(resumed.stdout + resumed.stderr))]
    assert min(went_on) == saved + 1  # from the checkpoint, not from round 1
    rounds = [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert rounds[:again] == list(range(1, again + 1))  # one row per round, the first run's kept


@pytest.mark.slow
def test_sigterm_after_the_last_round_keeps_the_model(tmp_path, data_root):
    out = tmp_path / "run"
    run = Run(*B, "train.rounds=3", f"hydra.run.dir={out}")
    run.wait_for(r"round 3/3")
    run.signal(signal.SIGTERM)
    returncode, _, stderr = run.finish()
    assert (out / "model.pt").exists(), stderr[-3000:]
    if returncode == 0:  # the signal came too late: the run was done (the in-process test below is exact)
        return
    assert returncode == 143, stderr[-3000:]
    line = assert_one_line(stderr, "SIGTERM")
    assert line == f"interrupted by SIGTERM after the last round; the final model is in {out / 'model.pt'}"
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, data_root) -> Path:
    """An uninterrupted 2-round run's folder (the reference of the tests below; copy it to change it)."""
    out = tmp_path_factory.mktemp("two_rounds") / "run"
    assert run_experiment(make_config(*B, "train.rounds=2"), out).rounds[-1]["round"] == 2
    return out


@pytest.mark.parametrize("where", ["after_log", "after_checkpoint"])
def test_an_interrupt_after_the_last_round_still_writes_model_pt(two_rounds, tmp_path, monkeypatch, where):
    """Exact timing, in-process: the interrupt lands right after the last round's metrics row, or right
    after its checkpoint; either way model.pt is the final model."""
    import raypfl.driver.experiment as experiment

    if where == "after_log":
        original = RunTracker.log_round

        def log_round(self, row, *args, **kwargs):
            original(self, row, *args, **kwargs)
            if row["round"] == 2:
                raise RunInterrupted(signal.SIGTERM)

        monkeypatch.setattr(RunTracker, "log_round", log_round)
    else:
        original = experiment._checkpoint

        def checkpoint(path, cfg, round_idx, *args):
            original(path, cfg, round_idx, *args)
            if round_idx == 2:
                raise RunInterrupted(signal.SIGTERM)

        monkeypatch.setattr(experiment, "_checkpoint", checkpoint)
    cfg = make_config(*B, "train.rounds=2")
    with pytest.raises(RunInterrupted):
        run_experiment(cfg, tmp_path / "cut")
    monkeypatch.undo()
    import torch

    cut = torch.load(tmp_path / "cut" / "model.pt")
    for name, tensor in torch.load(two_rounds / "model.pt").items():  # the uninterrupted run's
        assert torch.equal(cut[name], tensor), name


def test_resuming_a_run_done_but_for_its_model_writes_the_model(two_rounds, tmp_path):
    shutil.copytree(two_rounds, tmp_path / "done")
    (tmp_path / "done" / "model.pt").unlink()  # as if interrupted between the last checkpoint and the model
    assert load_checkpoint(tmp_path / "done")["round"] == 2
    resumed = run_experiment(make_config(*B, "train.rounds=2", f"resume={tmp_path / 'done'}"), tmp_path / "r")
    assert (tmp_path / "r" / "model.pt").exists()
    assert [r["round"] for r in resumed.rounds] == [1, 2]


def test_the_final_round_is_always_checkpointed(tmp_path, data_root):
    run_experiment(make_config(*B, "train.rounds=3", "train.checkpoint_every=2"), tmp_path)
    assert load_checkpoint(tmp_path / FILENAME)["round"] == 3


# --- Ray: nothing outlives the run ----------------------------------------------------------------


def ray_session_of(procs) -> str:
    for proc in procs:
        try:
            found = re.search(r"session_\d{4}-\d\d-\d\d_[\d-]+_\d+_\d+", " ".join(proc.cmdline()))
        except psutil.Error:
            continue
        if found:
            return found.group(0)
    return ""


def command_lines(procs: list[psutil.Process]) -> list[str]:
    """The command lines of those of `procs` still running."""
    lines = []
    for proc in procs:
        try:
            lines.append(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
    return lines


def processes_of_session(session: str) -> list[str]:
    """Processes whose command line or open files name the Ray session (agents rename themselves)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            names = " ".join(proc.info["cmdline"] or []) + " ".join(f.path for f in proc.open_files())
        except psutil.Error:
            continue
        if session in names:
            found.append(" ".join(proc.info["cmdline"] or [])[:120])
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL], ids=["KILL"])
def test_no_ray_process_outlives_the_driver(tmp_path, data_root, signum):
    """A run with its own Ray: even after a SIGKILL of the driver, which no handler sees, every process
    it started is gone within 10 s (Ray's agents used to linger for a minute). SIGTERM and SIGINT take
    the clean path (ray.shutdown) checked by test_ctrl_c_while_ray_starts; SIGTERM works here too (the
    parameter is kept for it), left out of the suite for time: a run with its own Ray costs ~18 s.

    `runtime.warm_start=false`: every round runs on the actors, so the actor processes are up and working
    when the driver dies. With warm start the driver trained rounds in a loop while its Ray booted (~345 on
    a busy 2-core machine), which delayed the pool by ~15 s; where the rounds before the SIGKILL ran does
    not matter here (the warm start with a Ray of the run's own is in test_ctrl_c_while_ray_starts)."""
    out = tmp_path / "run"
    run = Run(*B, *OWN_RAY, "runtime.warm_start=false", MANY, f"hydra.run.dir={out}")
    seen = run.track_descendants()
    try:
        run.wait_for(r"round +3/5000")  # rounds go on on the actors
    except BaseException:
        run.kill()
        raise
    session = ray_session_of(list(seen.values()))
    commands = command_lines(list(seen.values()))
    assert session and any("raylet" in c for c in commands), commands
    assert any("ClientActor" in c for c in commands), commands  # the pool's processes are among them
    run.signal(signum)
    returncode, _, stderr = run.finish()
    assert outlivers(list(seen.values()), within=10) == []
    assert processes_of_session(session) == []
    if signum == signal.SIGKILL:
        assert returncode == -signal.SIGKILL
        return
    assert returncode == 143, stderr[-3000:]
    assert_one_line(stderr, "SIGTERM")
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_ctrl_c_while_ray_starts(tmp_path, data_root):
    """SIGINT while `ray.init` runs is held until Ray is up (an interrupt inside Ray's core-worker start
    crashed the process at exit), then the run ends as for any interrupt, leaving no Ray process."""
    out = tmp_path / "run"
    run = Run(*B, *OWN_RAY, MANY, f"hydra.run.dir={out}")
    seen = run.track_descendants()
    try:
        run.wait_for(r"fedavg on mnist")
        deadline = time.monotonic() + 120
        while not any("gcs_server" in c for c in command_lines(list(seen.values()))):  # some exit meanwhile
            assert time.monotonic() < deadline, "Ray did not start"
            time.sleep(0.1)  # Ray is starting once its GCS runs
    except BaseException:
        run.kill()
        raise
    run.signal(signal.SIGINT)
    returncode, _, stderr = run.finish()
    assert returncode == 130, stderr[-3000:]
    assert_one_line(stderr, "SIGINT")
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"
    assert outlivers(list(seen.values()), within=10) == []
