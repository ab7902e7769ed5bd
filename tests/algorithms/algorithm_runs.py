"""Helpers of tests/algorithms/test_algorithm_runtimes.py, and the one MPI job it starts.

`quick_runs()` makes in-process test runs cheaper without touching what they compute: the plots are not
drawn and a dataset is read from disk once per process (both cost more than three rounds of the tiny runs).

`python algorithm_runs.py SPEC.json`, started once under `mpiexec -n 2`, does two things for all
the algorithms, so that their start-up (Python, torch, and the ~5 s import of torch._dynamo that torch.optim
does on its first step) is paid once per rank instead of once per run:

1. Before MPI starts (mpi4py is imported only afterwards), each rank forks the crash runs of its share of
   the algorithms, one after another: a child is a plain sequential run (`spec["crash"][alg]`: overrides
   with `faults.crash_after_round`) that SIGKILLs itself after that round's checkpoint. The parent records
   how each child ended in `crash-ALG.json` ({"returncode": -9} for a SIGKILL, as subprocess reports it).
2. Then every rank runs the MPI runs one after another (`spec["mpi"][alg]`, `runtime=mpi`); rank 0 saves
   each final model, broadcast and server state in `mpi-ALG.npz` (`flatten_result`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `tests.conftest` and `raypfl` importable
    sys.path.insert(0, str(REPO))

#: The plots RunTracker.finish draws (~1 s a run; nothing here looks at them).
PLOTS = ("plot_metrics", "plot_time_breakdown", "plot_client_losses", "plot_client_timing")


@contextlib.contextmanager
def quick_runs():
    """No plots, and each dataset loaded once (the same arrays, which nothing writes to)."""
    import pytest
    from omegaconf import OmegaConf

    import raypfl.driver.experiment
    import raypfl.tracking.plots

    load = raypfl.driver.experiment.load_data
    cache: dict = {}

    def cached(cfg):
        key = (OmegaConf.to_yaml(cfg.dataset, resolve=True), cfg.seed)
        if key not in cache:
            cache[key] = load(cfg)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        for name in PLOTS:
            patch.setattr(raypfl.tracking.plots, name, lambda *args, **kwargs: None)
        patch.setattr(raypfl.driver.experiment, "load_data", cached)
        yield


def flatten_result(result) -> dict[str, np.ndarray]:
    """A RunResult's final model, broadcast, server state and client states as named arrays (for .npz)."""
    arrays = {"weights": result.weights}
    arrays.update({f"broadcast/{k}": v for k, v in result.server.broadcast.items()})
    arrays.update({f"state/{k}": np.asarray(v) for k, v in result.server.state.items()})
    arrays.update({f"client/{k}": np.asarray(v) for k, v in result.client_states.items()})
    last = result.rounds[-1]  # the per-client evaluation's summary, if the run had one
    arrays.update({f"row/{k}": np.asarray(v) for k, v in last.items() if k.endswith(("_mean", "_worst10"))})
    return arrays


def unflatten(arrays) -> dict[str, dict]:
    """`flatten_result`'s arrays back: {"weights": w, "broadcast": {...}, "state": {...}, "client": {...}}."""
    out: dict[str, dict] = {"broadcast": {}, "state": {}, "client": {}, "row": {}}
    for key in arrays:
        group, _, name = key.partition("/")
        if group == "weights":
            out["weights"] = arrays[key]
        else:
            value = arrays[key]
            out[group][int(name) if group == "client" else name] = value.item() if value.ndim == 0 else value
    return out


def _crash(overrides: list[str], out: Path) -> int:
    """Run `overrides` in a forked child that is expected to SIGKILL itself; its returncode as subprocess
    reports one (-9 for SIGKILL)."""
    from raypfl.driver.experiment import run_experiment
    from tests.conftest import make_config

    cfg = make_config(*overrides)
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        code = 1
        try:
            run_experiment(cfg, out)
            code = 0  # it should have been killed
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    rank, size = int(os.environ.get("PMI_RANK", 0)), int(os.environ.get("PMI_SIZE", 1))
    import torch._dynamo  # noqa: F401 (imported by torch.optim's first step: once here, not in every child)

    import raypfl.driver.experiment as experiment
    from tests.conftest import make_config

    with quick_runs():
        crash = sorted(spec["crash"].items())
        for alg, overrides in crash[rank::size]:
            experiment.load_data(make_config(*overrides))  # cached before forking: the children inherit it
            code = _crash(overrides, out / alg)
            (out / f"crash-{alg}.json").write_text(json.dumps({"returncode": code}))
        for alg, overrides in sorted(spec["mpi"].items()):  # every rank, in the same order
            result = experiment.run_experiment(make_config(*overrides), out / f"mpi-{alg}")
            if result is not None:  # rank 0
                np.savez(out / f"mpi-{alg}.npz", **flatten_result(result))


if __name__ == "__main__":
    main(sys.argv[1])
