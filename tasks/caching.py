"""How tasks cache: the key is the task's name, its keyed inputs and a digest of the code it really runs.

Each task declares the modules that decide its result (its own module always counts). An unlearning
task adds the modules of the method it runs, so editing one method's file recomputes only that method's
unlearning tasks and what depends on their output; originals, proxies and references stay cached.
Inputs that only say where files live (`workdir`) or how a run is labelled (`label`) are not keyed, so a
moved run folder finds its records again. Results are checksummed JSON records (tasks.records).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, TypeVar

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from rumflow.tasks.compute import in_compute_slot
from rumflow.tasks.records import RecordSerializer, VerifiedFiles

# Inputs that never change a result: where the run folder is, the human-readable label, and the
# in-process handle of the running experiment whose state a chain task reads.
UNKEYED = frozenset({"workdir", "label", "run_key"})

# Module groups the tasks share (the data set, models, the training loop, the checkpoint store).
DATA = ("rumflow.data", "rumflow.readers", "rumflow.runtime", "rumflow.registry")
MODELS = ("rumflow.models",)
TRAINING = ("rumflow.training", "rumflow.proxies.learning_events")
STORE = ("rumflow.artifacts.checkpoints", "rumflow.tasks.refs", "rumflow.tasks.records")
EVALUATION = ("rumflow.evaluation", "rumflow.metrics", "rumflow.planning")


@lru_cache(maxsize=None)
def module_digest(name: str) -> str:
    """sha256 of one module's source file."""
    # found, not imported: a key may name a module that is slow to import (matplotlib behind the report)
    spec = importlib.util.find_spec(name)
    path = spec.origin if spec is not None and spec.has_location else None
    if not path:
        return hashlib.sha256(name.encode()).hexdigest()
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_digest(modules: Iterable[str]) -> str:
    """sha256 over the sources of `modules` (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(name.encode())
        h.update(module_digest(name).encode())
    return h.hexdigest()


def _methods_used_by(module: ModuleType) -> set[str]:
    """rumflow.methods.* modules whose functions, classes or selves `module` refers to, transitively."""
    seen: set[str] = set()
    todo = [module.__name__]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for value in vars(sys.modules[name]).values():
            ref = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
            if isinstance(ref, str) and ref.startswith("rumflow.methods") and ref in sys.modules:
                todo.append(ref)
    return seen


@lru_cache(maxsize=None)
def method_modules(method: str) -> tuple[str, ...]:
    """The modules that decide what method `method` returns: its own, its preparation's, the method
    modules those use, the registry (the envelope) and the shared helpers."""
    from rumflow.methods.registry import get_method

    m = get_method(method)
    fns = [m.fn] + ([m.prepare.fn] if m.prepare else [])
    names = {"rumflow.methods.registry", "rumflow.methods.common"}
    for fn in fns:
        names |= _methods_used_by(sys.modules[fn.__module__])
    return tuple(sorted(names))


def identity(value: Any) -> Any:
    """What of an input decides a result: a reference's `cache_identity()` (the content digest of its
    files, not the seconds it took to make them), lists and dicts element-wise, anything else itself."""
    if hasattr(value, "cache_identity"):
        return value.cache_identity()
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if isinstance(value, dict):
        return {k: identity(v) for k, v in value.items()}
    return value


@dataclass
class TaskKey(CachePolicy):
    """Cache key = task name + code digest (static modules, plus any chosen from the inputs) + keyed inputs."""

    modules: tuple[str, ...] = ()
    dynamic: Callable[[dict[str, Any]], Iterable[str]] | None = field(default=None)

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        keyed = {k: identity(v) for k, v in (inputs or {}).items() if k not in UNKEYED}
        return hash_objects(task_ctx.task.name, self.code(task_ctx.task.fn.__module__, inputs or {}), keyed,
                            raise_on_failure=True)

    def code(self, own_module: str, inputs: dict[str, Any]) -> str:
        """The digest of the code this call runs."""
        names = set(self.modules) | {own_module}
        if self.dynamic is not None:
            names |= set(self.dynamic(inputs))
        return code_digest(names)


def task_modules(t: Task) -> set[str]:
    """The modules task `t`'s key always covers: its own and its static ones (not those its inputs add)."""
    return {t.fn.__module__} | set(getattr(t.cache_policy, "modules", ()))


F = TypeVar("F", bound=Callable[..., Any])


def cached_task(name: str, run_name: str | None = None, code: Iterable[str] = (),
                code_of: Callable[[dict[str, Any]], Iterable[str]] | None = None) -> Callable[[F], Task]:
    """A Prefect task cached across runs, processes and machines (bind storage with `in_run_dir`).

    `code` lists the modules that decide its result besides its own; `code_of(inputs)` adds modules
    chosen by the inputs (an unlearning task: its method's)."""

    def wrap(fn: F) -> Task:
        return task(in_compute_slot(fn), name=name, task_run_name=run_name, persist_result=True, log_prints=False,
                    cache_result_in_memory=False,  # every hit reads (and verifies) its record file
                    cache_policy=TaskKey(modules=tuple(code), dynamic=code_of),
                    result_serializer=RecordSerializer())

    return wrap


def record_storage(run_dir: Path | str) -> VerifiedFiles:
    """The verified record storage of a run folder, registered with the Prefect API (Prefect requires
    result storage blocks to be saved; the block holds only the folder's path)."""
    basepath = str(Path(run_dir).expanduser().resolve() / "cache")
    name = "rumflow-" + hashlib.sha256(basepath.encode()).hexdigest()[:20]
    block = VerifiedFiles(basepath=basepath)
    block.save(name, overwrite=True)
    return block


def in_run_dir(t: Task, run_dir: Path | str | VerifiedFiles) -> Task:
    """The task with its records stored (and verified when read) under `<run_dir>/cache`."""
    storage = run_dir if isinstance(run_dir, VerifiedFiles) else record_storage(run_dir)
    return t.with_options(result_storage=storage)


def code_sha(modules: Iterable[str]) -> str:
    """The short digest written in the `code_sha` column of rows produced by `modules`."""
    return code_digest(modules)[:12]
