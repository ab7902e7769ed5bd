"""`hydra/launcher=ray`: run a sweep's jobs concurrently on ONE Ray (local, or a running cluster).

Each job is a Ray task that runs the normal job function; a `runtime=ray` job then finds Ray already
connected and places its client actors on the shared cluster (it never starts or stops Ray itself).
Every job gets `actors_per_job` client actors, and no more jobs run at once than the CPUs can hold, so
concurrent jobs cannot starve each other of actors. A job that fails, or whose worker dies, is recorded
as failed; the other jobs go on.
"""

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.raypfl_launcher.ray_launcher.RayLauncher"
    address: Optional[str] = None  # a running cluster ("auto", "ray://host:10001"); None: start a local Ray
    num_cpus: Optional[int] = None  # CPUs of the local Ray (None: all cores)
    actors_per_job: int = 1  # client actors each runtime=ray job gets (sets runtime.num_actors)
    cpus_per_actor: float = 1.0
    max_concurrent: Optional[int] = None  # jobs at once (None: as many as the CPUs hold)
    object_store_mb: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="raypfl")


def _run_job(hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction, state: Any):
    """The body of one job's Ray task: the same job function the basic launcher calls."""
    setup_globals()
    Singleton.set_state(state)
    HydraConfig.instance().set_config(config)
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _job_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def _job_status(config: DictConfig) -> str:
    """What the job recorded in its result.json ("ok", "failed"), or "unfinished"."""
    import json

    path = _job_dir(config) / "result.json"
    return json.loads(path.read_text()).get("status", "unfinished") if path.exists() else "unfinished"


class RayLauncher(Launcher):
    def __init__(
        self,
        address=None,
        num_cpus=None,
        actors_per_job=1,
        cpus_per_actor=1.0,
        max_concurrent=None,
        object_store_mb=None,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.actors_per_job = actors_per_job
        self.cpus_per_actor = cpus_per_actor
        self.max_concurrent = max_concurrent
        self.object_store_mb = object_store_mb
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _start_ray(self) -> bool:
        """Start (or join) the sweep's one Ray, as a run would; True if this launcher started it."""
        from raypfl.config import RuntimeSpec
        from raypfl.runtime.ray_start import DEFAULT_CONNECT_TIMEOUT_S, start_ray

        runtime = self.config.get("runtime", {})
        address = self.address or runtime.get("address")
        timeout = runtime.get("connect_timeout_s") or DEFAULT_CONNECT_TIMEOUT_S
        spec = RuntimeSpec(
            address=address,
            connect_timeout_s=timeout,
            num_cpus=self.num_cpus,
            object_store_mb=self.object_store_mb,
        )
        # a local Ray is bound to the loopback; a wrong address fails within the timeout (exit 2)
        return start_ray(spec, key="hydra.launcher.address" if self.address else "runtime.address")

    def _concurrency(self) -> int:
        import ray

        if self.max_concurrent:
            return self.max_concurrent
        cpus = ray.cluster_resources().get("CPU", 1)
        return max(1, int(cpus // (self.actors_per_job * self.cpus_per_actor)))

    def _job_config(self, overrides: list[str], idx: int) -> DictConfig:
        extra = (
            []
            if any(o.lstrip("+~").startswith("runtime.num_actors=") for o in overrides)
            else [
                f"++runtime.num_actors={self.actors_per_job}",
                f"++runtime.cpus_per_actor={self.cpus_per_actor}",
            ]
        )
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides + extra)
        with open_dict(config):
            config.hydra.job.id = f"ray_job_{idx}"
            config.hydra.job.num = idx
        return config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        started_ray = self._start_ray()
        try:
            concurrency = self._concurrency()
            log.info(
                "Ray launcher: %d jobs, %d at a time, %d client actor(s) each; sweep dir %s",
                len(job_overrides),
                concurrency,
                self.actors_per_job,
                sweep_dir,
            )
            return self._run_all(job_overrides, initial_job_idx, concurrency)
        finally:
            if started_ray:
                ray.shutdown()

    def _run_all(self, job_overrides, initial_job_idx: int, concurrency: int) -> list[JobReturn]:
        import ray

        remote_job = ray.remote(max_retries=0)(_run_job)
        returns: dict[int, JobReturn] = {}
        running: dict[Any, tuple[int, DictConfig, float]] = {}
        state = Singleton.get_state()
        total = len(job_overrides)

        def collect(block: bool) -> None:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=None if block else 0)
            for ref in ready:
                idx, config, started = running.pop(ref)
                returns[idx] = self._job_return(ref, idx, config, started)
                status = _job_status(config)
                log.info(
                    "job %d finished (%s) after %.1f s [%d/%d done]",
                    idx,
                    status,
                    time.time() - started,
                    len(returns),
                    total,
                )

        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            while len(running) >= concurrency:
                collect(block=True)
            config = self._job_config(list(overrides), idx)
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_cpus = 0 if config.runtime.name == "ray" else config.runtime.get("torch_threads", 1)
            task = remote_job.options(num_cpus=job_cpus)
            ref = task.remote(self.hydra_context, config, self.task_function, state)
            running[ref] = (idx, config, time.time())
        while running:
            collect(block=True)
        return [returns[initial_job_idx + i] for i in range(total)]

    @staticmethod
    def _job_return(ref, idx: int, config: DictConfig, started: float) -> JobReturn:
        """The job's JobReturn; if its Ray task itself died, a failed one (and a result.json saying so)."""
        import ray

        try:
            return ray.get(ref)
        except Exception as exc:  # the worker crashed or was killed: the job function never returned
            from raypfl.tracking.report import write_result

            job_dir = _job_dir(config)
            job_dir.mkdir(parents=True, exist_ok=True)
            write_result(job_dir, started, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0])
            print(f"job {idx} failed: {exc}", file=sys.stderr)
            ret = JobReturn()
            ret.status = JobStatus.FAILED
            ret._return_value = exc
            ret.overrides = []
            return ret
