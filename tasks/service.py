"""The service's cached tasks: train a version, score it, unlearn a tier, evaluate a version.

Tasks exchange sha256 digests and paths relative to the service folder, never tensors or absolute
paths, so their cache keys survive moving the folder. The folder itself is ambient: the flow enters
`service_root(path)` once and every task resolves digests under it (Prefect copies the context into
its worker threads).
"""
from __future__ import annotations

import contextvars
import hashlib
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict

from rumflow.artifacts.checkpoints import CheckpointStore
from rumflow.artifacts.tables import write_parquet
from rumflow.config import DataConfig, EvaluateConfig, HoldoutConfig, MethodSpec, ModelConfig, TrainConfig
from rumflow.errors import ConfigError
from rumflow.methods import UnlearnContext, run_method
from rumflow.planning import StepPlan
from rumflow.runtime import augments, dataset_on, fresh_model, model_from_state, recipe
from rumflow.service import EvaluateSettings, load_weights
from rumflow.tasks import caching
from rumflow.training import predict, resolve_device, sync, train_model

_ROOT: contextvars.ContextVar[Path] = contextvars.ContextVar("rumflow_service_root")


@contextmanager
def service_root(path: str | Path) -> Iterator[Path]:
    """Make `path` the service folder the tasks of this context read and write."""
    token = _ROOT.set(Path(path).resolve())
    try:
        yield _ROOT.get()
    finally:
        _ROOT.reset(token)


def root() -> Path:
    """The current service folder (set by `service_root`)."""
    try:
        return _ROOT.get()
    except LookupError:
        raise RuntimeError("service tasks run inside `service_root(folder)`; the service flow sets it") from None


try:  # task records hold registered pydantic types only (tasks.records), where that layer exists
    from rumflow.tasks.records import record_type
except ImportError:  # pragma: no cover - older task layer
    def record_type(cls):  # type: ignore[no-redef]
        return cls


def _cached(name: str, run_name: str, code: tuple[str, ...] = (), code_of: Any = None) -> Any:
    """`cached_task` declaring the modules that decide the result (where the task layer takes them)."""
    try:
        return caching.cached_task(name, run_name, code=code, code_of=code_of)
    except TypeError:  # pragma: no cover - a task layer that keys every task on all the code
        return caching.cached_task(name, run_name)


def _modules(*groups: str) -> tuple[str, ...]:
    """The named module groups of the task layer (DATA, MODELS, ...), plus this module's core helpers."""
    names = {"rumflow.service", "rumflow.artifacts.checkpoints"}
    for group in groups:
        names |= set(getattr(caching, group, ()))
    return tuple(sorted(names))


def _method_code(inputs: dict[str, Any]) -> tuple[str, ...]:
    """The modules of the method an unlearning or preparation call runs."""
    modules = getattr(caching, "method_modules", None)
    spec = inputs.get("spec")
    return tuple(modules(spec.method)) if modules and spec is not None else ()


def store() -> CheckpointStore:
    return CheckpointStore(root() / "models")


def model_file(sha256: str, base: Path | None = None) -> Path:
    """Where weights `sha256` live in the service's store."""
    return (base or root()) / "models" / f"{sha256}.pt"


load_file = load_weights  # the verified loader lives in the core (the CLI exports without Prefect)


def load_state(sha256: str) -> dict[str, torch.Tensor]:
    """The verified state dict of version weights `sha256`."""
    return load_file(model_file(sha256), sha256)


def save(model_or_state: Any) -> str:
    """Store weights in the service's store and return their digest."""
    return store().save(model_or_state).sha256


def _present(sha256: str, base: Path | None) -> bool:
    return model_file(sha256, base).is_file()


@record_type
class ServiceModel(BaseModel):
    """Weights in the store (by digest), their training time, and recorded learning events (relative path)."""

    model_config = ConfigDict(frozen=True)
    sha256: str
    seconds: float
    events: str | None = None

    def intact(self, base: Path | None = None) -> bool:
        base = Path(base) if base is not None else root()
        return _present(self.sha256, base) and (self.events is None or (base / self.events).is_file())


@record_type
class ServiceScores(BaseModel):
    """One proxy's per-example scores (Parquet: example_id, score), relative to the service folder."""

    model_config = ConfigDict(frozen=True)
    proxy: str
    path: str
    seconds: float

    def intact(self, base: Path | None = None) -> bool:
        return ((Path(base) if base is not None else root()) / self.path).is_file()

    def load(self) -> pd.DataFrame:
        return pd.read_parquet(root() / self.path)


def _write_scores(name: str, ids: np.ndarray, values: dict[str, np.ndarray]) -> str:
    """Write a scores table named by its content; returns its path relative to the service folder."""
    df = pd.DataFrame({"example_id": ids, **values})
    digest = hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()[:16]
    rel = Path("scores") / f"{name}-{digest}.parquet"
    write_parquet(df, root() / rel)
    return rel.as_posix()


def ensure(t: Any, *args: Any, **kwargs: Any) -> Any:
    """Call task `t`; if its cached result points at files that are gone, recompute it."""
    result = t(*args, **kwargs)
    if hasattr(result, "intact") and not result.intact():
        result = t.with_options(refresh_cache=True)(*args, **kwargs)
    return result


@_cached("service-train", "train {label}", _modules("DATA", "MODELS", "TRAINING", "STORE"))
def train_version(data: DataConfig, model: ModelConfig, train: TrainConfig, seed: int, exclude: list[int],
                  record_events: bool, device: str, label: str) -> ServiceModel:
    """Train from scratch on D_train minus `exclude` (version 0, or an audit's retrain reference)."""
    from rumflow.proxies.learning_events import LEARNING_EVENTS

    ds = dataset_on(data, device)
    split = ds.train.drop(exclude) if exclude else ds.train
    net = fresh_model(model, ds, seed)
    result = train_model(net, split, recipe(train), seed=seed, augment=augments(train, ds),
                         record_events=record_events)
    events = None
    if result.events is not None:
        cols = result.events.cpu().numpy()
        events = _write_scores("learning-events", split.ids(), {n: cols[:, i] for i, n in enumerate(LEARNING_EVENTS)})
    return ServiceModel(sha256=save(net), seconds=result.seconds, events=events)


@_cached("service-score", "score {label}/{proxy}", _modules("DATA", "MODELS", "STORE") + ("rumflow.proxies.holdout",))
def score_version(sha256: str, proxy: str, data: DataConfig, model: ModelConfig, holdout: HoldoutConfig, seed: int,
                  device: str, label: str) -> ServiceScores:
    """Holdout-retraining scores of every training example on the model `sha256`."""
    from rumflow.proxies.holdout import holdout_retraining

    ds = dataset_on(data, device)
    net = model_from_state(model, ds, load_state(sha256))
    sync(resolve_device(device))
    start = time.perf_counter()
    scores = holdout_retraining(net, ds.train, getattr(ds, holdout.split), holdout,
                                generator=torch.Generator().manual_seed(seed))
    sync(resolve_device(device))
    seconds = time.perf_counter() - start
    return ServiceScores(proxy=proxy, path=_write_scores(proxy, ds.train.ids(), {"score": np.asarray(scores)}),
                  seconds=seconds)


@record_type
class ServiceUnlearned(BaseModel):
    """The weights after one tier's unlearning (by digest) and its wall time."""

    model_config = ConfigDict(frozen=True)
    sha256: str
    seconds: float

    def intact(self, base: Path | None = None) -> bool:
        return _present(self.sha256, Path(base) if base is not None else None)


def _context(model: ModelConfig, train: TrainConfig, ds: Any, seed: int,
             prepared: dict[str, torch.Tensor] | None = None) -> UnlearnContext:
    return UnlearnContext(seed=seed, recipe=recipe(train), fresh_model=lambda: fresh_model(model, ds, seed),
                          augment=augments(train, ds), prepared=prepared, val=ds.val)


@_cached("service-prepare", "prepare {label}/{tier}/{spec.method}", _modules("DATA", "MODELS", "TRAINING", "STORE"), _method_code)
def prepare_tier(parent: str, forget: list[int], exclude: list[int] | None, spec: MethodSpec, seed: int | None,
                 data: DataConfig, model: ModelConfig, train: TrainConfig, device: str, label: str,
                 tier: str) -> ServiceUnlearned:
    """A method's preparation (mask, importances, teacher) on the parent model, stored like weights."""
    from rumflow.methods.registry import prepare_method

    ds = dataset_on(data, device)
    net = model_from_state(model, ds, load_state(parent))
    retain = ds.train.drop(exclude) if exclude is not None else ds.train.take([])
    sync(resolve_device(device))
    start = time.perf_counter()
    state = prepare_method(spec.method, spec.params, net, ds.train.take(forget), retain,
                           _context(model, train, ds, seed or 0))
    sync(resolve_device(device))
    return ServiceUnlearned(sha256=save(state), seconds=time.perf_counter() - start)


@_cached("service-unlearn", "unlearn {label}/{tier}/{spec.method}", _modules("DATA", "MODELS", "TRAINING", "STORE"), _method_code)
def unlearn_tier(parent: str, forget: list[int], exclude: list[int], spec: MethodSpec, seed: int, data: DataConfig,
                 model: ModelConfig, train: TrainConfig, device: str, label: str, tier: str,
                 prepared: str | None = None) -> ServiceUnlearned:
    """Apply one tier's method to the parent weights: forget `forget`, retain D_train minus `exclude`."""
    ds = dataset_on(data, device)
    net = model_from_state(model, ds, load_state(parent))
    state = None if prepared is None else {k: v.to(ds.train.x.device) for k, v in load_state(prepared).items()}
    sync(resolve_device(device))
    start = time.perf_counter()
    net = run_method(spec.method, spec.params, net, ds.train.take(forget), ds.train.drop(exclude),
                     _context(model, train, ds, seed, state))
    sync(resolve_device(device))
    return ServiceUnlearned(sha256=save(net), seconds=time.perf_counter() - start)


@_cached("service-evaluate", "evaluate {label}", _modules("DATA", "MODELS", "EVALUATION", "STORE"))
def evaluate_version(sha256: str, plan: StepPlan, data: DataConfig, model: ModelConfig,
                     evaluate: EvaluateSettings, seed: int, device: str, label: str) -> dict[str, float]:
    """Accuracies on the step's forget set, the retain set, val and test; the MIA on the forget set and,
    as its reference, on the validation split (examples the model never saw)."""
    from rumflow.evaluation import evaluate_model
    from rumflow.metrics import svc_mia

    ds = dataset_on(data, device)
    net = model_from_state(model, ds, load_state(sha256))
    sync(resolve_device(device))
    start = time.perf_counter()
    cfg = EvaluateConfig(mia=evaluate.mia, mia_max_shadow=evaluate.mia_max_shadow)
    out = evaluate_model(net, ds, plan, cfg, seed)
    out["mia_heldout"] = float("nan")
    if evaluate.mia:
        retain = ds.train.drop(plan.forgotten)
        out["mia_heldout"] = svc_mia(predict(net, retain.x), retain.y, predict(net, ds.test.x), ds.test.y,
                                     predict(net, ds.val.x), ds.val.y, max_shadow=evaluate.mia_max_shadow,
                                     seed=seed)["mia"]
    sync(resolve_device(device))
    out["seconds_evaluate"] = time.perf_counter() - start
    return out


def experiment_original(run_dir: Path, seed: int, data: DataConfig, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The verified weights of seed `seed`'s original model in a finished `rumflow run` folder, after
    checking that the run used the service's data set and architecture."""
    from rumflow.config import load_config

    run_dir = Path(run_dir).expanduser()
    steps = run_dir / "steps.parquet"
    if not steps.is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"'{run_dir}' is not a finished experiment run (no steps.parquet and config.yaml); "
                          "point version0.run at <out>/<name>/ of a `rumflow run` that completed.")
    exp = load_config(run_dir / "config.yaml")
    if exp.data != data or exp.model != model:
        raise ConfigError(f"the experiment in '{run_dir}' used data {exp.data.name} / model {exp.model.name} "
                          f"(split seed {exp.data.split_seed}), not the service's {data.name} / {model.name} "
                          f"(split seed {data.split_seed}); make the service's data and model sections match it.")
    table = pd.read_parquet(steps, columns=["seed", "strategy", "checkpoint"])
    rows = table[(table["strategy"] == "original") & (table["seed"] == seed)]
    if rows.empty:
        raise ConfigError(f"the experiment in '{run_dir}' has no seed {seed}; set version0.seed to one of "
                          f"{sorted(table['seed'].unique().tolist())}.")
    sha = str(rows["checkpoint"].iloc[0])
    return load_file(run_dir / "checkpoints" / f"{sha}.pt", sha)
