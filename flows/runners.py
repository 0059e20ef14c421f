"""The task runner a config asks for: threads, processes, a Ray cluster or a Dask cluster."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from prefect.futures import PrefectConcurrentFuture
from prefect.states import Pending, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from rumflow.config import ExperimentConfig, RunnerConfig
from rumflow.errors import ConfigError
from rumflow.training import resolve_device


THREADS_PER_SLOT, MIN_THREADS = 8, 32  # threads of the threads runner: waiting tasks park in the spare ones


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0))


def worker_count(runner: RunnerConfig, device: str) -> int:
    """Tasks at once: as configured, else one per CPU core (one per GPU on CUDA)."""
    if runner.workers:
        return runner.workers
    dev = resolve_device(device)
    if dev.type == "cuda":
        import torch

        return max(1, torch.cuda.device_count()) if runner.kind == "ray" else 1
    return cores()


def torch_threads_per_worker(runner: RunnerConfig, device: str) -> int:
    """Intra-op threads per task: one on CPU, whatever the number of workers. CPU kernels reduce in a
    different order with another thread count, so a fixed count is what makes the same config give the
    same checkpoints on every runner and worker count (and spinning OpenMP threads of several workers
    on the same cores collapse under load). On CUDA the host threads do not change the results."""
    if resolve_device(device).type == "cpu":
        return 1
    return max(1, cores() // worker_count(runner, device))


def worker_api_url() -> str | None:
    """The API that worker processes must report to: PREFECT_API_URL when set, else this process's
    embedded server (started now if it is not yet; the flow uses the same one). Without it each worker
    process would start an embedded server of its own (~15 s each) and its task runs would never reach
    the flow's API or its UI."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    url = PREFECT_API_URL.value()
    if url or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return url or None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the singleton that get_client() uses in ephemeral mode
    server.start()
    return server.api_url


class LocalStateFuture(PrefectConcurrentFuture):
    """A thread-pool future that tells its state from this process: the final state its task returned,
    or Pending while it is queued or running. Prefect reads the state of every future a task is given
    when it creates the task run (to find the parents of generator tasks, which rumflow has none of),
    and the stock future asks the API each time until its result is read: measured on a cached re-run
    of the default experiment, those reads were half of the task engine's time."""

    @property
    def state(self) -> State:
        wrapped = self._wrapped_future
        if self._final_state is None and wrapped.done() and not wrapped.cancelled() and wrapped.exception() is None:
            if isinstance(wrapped.result(), State):
                self._final_state = wrapped.result()
        return self._final_state if self._final_state is not None else Pending()


class LocalStateThreadPool(ThreadPoolTaskRunner):
    """Prefect's thread pool task runner, with futures that know their state locally (LocalStateFuture)."""

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        future = super().submit(task, parameters, wait_for, dependencies)
        return LocalStateFuture(future.task_run_id, future.wrapped_future)


def _missing(extra: str, package: str) -> ConfigError:
    return ConfigError(f"runner.kind={extra} needs the {package} package, which is not installed; install it with "
                       f"pip install -e '.[{extra}]' (or choose runner.kind=threads).")


def check_runner(runner: RunnerConfig) -> None:
    """Refuse a runner whose optional package is missing, before any work."""
    if runner.kind == "ray":
        try:
            import prefect_ray  # noqa: F401
            import ray  # noqa: F401
        except ImportError:
            raise _missing("ray", "prefect-ray") from None
    if runner.kind == "dask":
        try:
            import prefect_dask  # noqa: F401
        except ImportError:
            raise _missing("dask", "prefect-dask") from None


def task_runner(cfg: ExperimentConfig) -> Any:
    """A fresh Prefect task runner for `cfg.runner` (the flow starts and stops it)."""
    runner, workers = cfg.runner, worker_count(cfg.runner, cfg.device)
    check_runner(runner)
    env = {"RUMFLOW_TORCH_THREADS": str(torch_threads_per_worker(runner, cfg.device))}
    if runner.kind == "threads":
        # Threads are cheap and a waiting task must not hold a compute worker: many threads, and
        # `workers` compute slots that the tasks take once their inputs are ready (tasks.compute).
        os.environ["RUMFLOW_COMPUTE_SLOTS"] = str(workers)
        return LocalStateThreadPool(max_workers=max(THREADS_PER_SLOT * workers, MIN_THREADS))
    os.environ["RUMFLOW_COMPUTE_SLOTS"] = "0"  # a worker process runs one task at a time by itself
    if runner.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if runner.kind == "ray":
        from prefect_ray import RayTaskRunner

        env |= {k: v for k, v in os.environ.items() if k.startswith(("PREFECT_", "OMP_", "DO_NOT_TRACK"))}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        if runner.address is None and (url := worker_api_url()):  # a local cluster reports to this API
            env["PREFECT_API_URL"] = url
        init: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
        if runner.address is None:
            init |= {"num_cpus": workers, "include_dashboard": False}
        return _keeping_signals(RayTaskRunner)(address=runner.address, init_kwargs=init)
    from prefect_dask import DaskTaskRunner

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def _keeping_signals(base: type) -> type:
    """`base` (a task runner class) whose start keeps this process's SIGTERM/SIGINT handlers: ray.init
    installs a native failure handler that aborts the driver on SIGTERM (measured: status -6, no resume
    hint), which would bypass the CLI's clean stop."""
    import signal
    import threading

    class KeepingSignals(base):  # type: ignore[misc, valid-type]
        def __enter__(self):
            main = threading.current_thread() is threading.main_thread()
            before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
            out = super().__enter__()
            for sig, handler in before.items():
                if callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN):
                    signal.signal(sig, handler)  # re-installs it at the C level, over Ray's
            return out

    KeepingSignals.__name__ = KeepingSignals.__qualname__ = base.__name__
    return KeepingSignals


@contextmanager
def gpu_slot(cfg: ExperimentConfig) -> Iterator[None]:
    """Around a submit: on Ray with CUDA, ask Ray for one GPU per task (N GPUs run N tasks at once)."""
    if cfg.runner.kind == "ray" and resolve_device(cfg.device).type == "cuda":
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=1):
            yield
    else:
        with nullcontext():
            yield


_SHARED: dict[str, tuple[TaskRunner, Any]] = {}  # by key: a running flow's started task runner, and its state


@contextmanager
def sharing(runner: TaskRunner, state: Any = None) -> Iterator[str]:
    """Lend a started task runner (and the run's in-process state) to this process's subflows under a
    fresh key: see SharedTaskRunner and shared_state. Subflow parameters then stay small (the key)."""
    key = uuid.uuid4().hex
    _SHARED[key] = (runner, state)
    try:
        yield key
    finally:
        _SHARED.pop(key, None)


def shared_state(key: str) -> Any:
    """The state a running flow lent its subflows under `key`. (A module-level lookup: Prefect pickles a
    flow's or task's function by value, with the globals it names, and live run state must not go.)"""
    return _SHARED[key][1]


class SharedTaskRunner(TaskRunner):
    """A subflow's view of its parent flow's task runner: tasks submitted in the subflow go to the one
    runner the parent started (threads, processes, Ray or Dask), which the subflow neither starts nor
    stops. Only the key travels when a task's context is pickled for a worker process."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def duplicate(self) -> "SharedTaskRunner":
        return SharedTaskRunner(self.key)

    def __enter__(self) -> "SharedTaskRunner":
        self._started = True  # also in a worker process, where Prefect enters the runner of a task's flow
        return self

    def __exit__(self, *exc: Any) -> None:
        self._started = False

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        if self.key not in _SHARED:
            raise RuntimeError(f"no running flow of this process lends its task runner under key {self.key}")
        return _SHARED[self.key][0].submit(task, parameters, wait_for, dependencies)

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["key"])
