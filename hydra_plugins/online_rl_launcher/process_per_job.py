"""A Hydra launcher that runs each job of a multirun in a fresh Python process, one job after another.

Why: Hydra's default launcher runs every job in the sweep's own process, so whatever a job leaves behind
reaches the next one: vLLM's sleep-mode allocator exists once per process (a second colocated engine fails
with "CuMem allocator can only be used for one instance per process"), and CUDA contexts, compiled
graphs and trackio's state stay too. Here a job is a spawned child that composes, runs and returns its
result like the default launcher's, and exits before the next starts, which leaves the GPU to one job at
a time (submitit_local starts every job at once).

    python train.py -m algo=grpo,rloo                         # this launcher (online_rl/conf/train.yaml's default)
    python train.py -m algo=grpo,rloo hydra/launcher=basic    # Hydra's own: every job in this process
"""

import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class ProcessPerJobConf:
    _target_: str = "hydra_plugins.online_rl_launcher.process_per_job.ProcessPerJobLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="process_per_job", node=ProcessPerJobConf)


class ProcessPerJobLauncher(Launcher):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs, each in a process of its own, one after another")
        results = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            # cloudpickle: the task function lives in train.py (__main__), which plain pickle cannot name
            job = cloudpickle.dumps(
                (
                    self.hydra_context,
                    self.task_function,
                    self.config,
                    list(overrides),
                    idx,
                    Singleton.get_state(),
                )
            )
            spawn = multiprocessing.get_context("spawn")  # a fork would inherit this process's CUDA state
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as child:
                try:
                    result = cloudpickle.loads(child.submit(run_one_job, job).result())
                except BrokenProcessPool as error:  # killed (out of memory, a signal) or crashed in C
                    result = died(overrides, idx, error)
            results.append(result)
        return results


def run_one_job(job: bytes) -> bytes:
    """In the child: restore Hydra's state, compose this job's config and run it as Hydra's launcher would."""
    hydra_context, task_function, config, overrides, idx, singletons = cloudpickle.loads(job)
    Singleton.set_state(singletons)
    setup_globals()
    sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = idx
        sweep_config.hydra.job.num = idx
    result = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    return cloudpickle.dumps(result)


def died(overrides: Sequence[str], idx: int, error: BaseException) -> JobReturn:
    """A job whose process ended without a result: failed, named, and the sweep goes on as Hydra decides."""
    result = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    result.return_value = RuntimeError(
        f"multirun job #{idx} ({' '.join(overrides)}) died without a result ({error}): its process was "
        "killed (out of memory? a signal?) or crashed; its log is in its job directory under hydra.sweep.dir"
    )
    return result
