"""The units of work as cached Prefect tasks: thin wrappers that load, call pure code, and persist."""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict

from rumflow.artifacts.checkpoints import CheckpointRef, CheckpointStore
from rumflow.artifacts.tables import write_parquet
from rumflow.config import (DataConfig, EvaluateConfig, HoldoutConfig, MemorizationConfig, MethodSpec, ModelConfig,
                            TrainConfig)
from rumflow.evaluation import evaluate_model
from rumflow.methods import UnlearnContext, run_method
from rumflow.planning import StepPlan
from rumflow.proxies.learning_events import LEARNING_EVENTS
from rumflow.runtime import augments, dataset_on, fresh_model, model_from_state, model_spec, recipe
from rumflow.tasks.caching import cached_task
from rumflow.training import resolve_device, sync, train_model


class Trained(BaseModel):
    """A trained model plus what its training measured."""

    model_config = ConfigDict(frozen=True)
    ckpt: CheckpointRef
    seconds: float
    events: str | None = None  # Parquet of the learning-event proxies, when recorded
    events_seconds: float = 0.0

    def intact(self) -> bool:
        return self.ckpt.looks_intact() and (self.events is None or Path(self.events).is_file())


class Scores(BaseModel):
    """Per-example scores of one proxy, stored as Parquet (example_id, score)."""

    model_config = ConfigDict(frozen=True)
    proxy: str
    path: str
    seconds: float

    def intact(self) -> bool:
        return Path(self.path).is_file()

    def load(self) -> pd.DataFrame:
        return pd.read_parquet(self.path)


class Unlearned(BaseModel):
    """The model after one unlearning call and its wall time."""

    model_config = ConfigDict(frozen=True)
    ckpt: CheckpointRef
    seconds: float

    def intact(self) -> bool:
        return self.ckpt.looks_intact()


def _store(workdir: str) -> CheckpointStore:
    return CheckpointStore(Path(workdir) / "checkpoints")


def _write_scores(workdir: str, name: str, ids: np.ndarray, values: dict[str, np.ndarray]) -> str:
    """Write a scores table named by its content digest; returns the path."""
    df = pd.DataFrame({"example_id": ids, **values})
    digest = hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()[:16]
    path = Path(workdir) / "scores" / f"{name}-{digest}.parquet"
    write_parquet(df, path)
    return str(path)


@cached_task("train", run_name="train-seed{seed}-minus{n_excluded}")
def train_task(data: DataConfig, model: ModelConfig, train: TrainConfig, seed: int, exclude: list[int],
               record_events: bool, device: str, workdir: str, n_excluded: int = 0) -> Trained:
    """Train from scratch on D_train minus `exclude` with the original recipe (and record learning events)."""
    ds = dataset_on(data, device)
    split = ds.train.drop(exclude) if exclude else ds.train
    net = fresh_model(model, ds, seed)
    result = train_model(net, split, recipe(train), seed=seed, augment=augments(train, ds),
                         record_events=record_events)
    ref = _store(workdir).save(net)
    events = None
    if result.events is not None:
        cols = result.events.cpu().numpy()
        events = _write_scores(workdir, "learning-events", split.ids(),
                               {name: cols[:, i] for i, name in enumerate(LEARNING_EVENTS)})
    return Trained(ckpt=ref, seconds=result.seconds, events=events, events_seconds=result.events_seconds)


def _learning_event_scores(proxy: str, trained: Trained, ckpt: CheckpointRef, data: DataConfig,
                           model: ModelConfig, holdout: HoldoutConfig, seed: int, device: str,
                           workdir: str) -> Scores:
    """One column of the events recorded while the original model trained (cost: the recording time)."""
    events = pd.read_parquet(trained.events)
    path = _write_scores(workdir, proxy, events["example_id"].to_numpy(), {"score": events[proxy].to_numpy()})
    return Scores(proxy=proxy, path=path, seconds=trained.events_seconds)


def _holdout_scores(proxy: str, trained: Trained, ckpt: CheckpointRef, data: DataConfig, model: ModelConfig,
                    holdout: HoldoutConfig, seed: int, device: str, workdir: str) -> Scores:
    """Symmetric KL between the model `ckpt` and a copy of it fine-tuned on the held-out split."""
    from rumflow.proxies.holdout import holdout_retraining

    ds = dataset_on(data, device)
    net = model_from_state(model, ds, CheckpointStore.load_state(ckpt))
    sync(resolve_device(device))
    start = time.perf_counter()
    scores = holdout_retraining(net, ds.train, getattr(ds, holdout.split), holdout,
                                generator=torch.Generator().manual_seed(seed))
    sync(resolve_device(device))
    seconds = time.perf_counter() - start
    path = _write_scores(workdir, proxy, ds.train.ids(), {"score": np.asarray(scores)})
    return Scores(proxy=proxy, path=path, seconds=seconds)


# How proxy_task computes each kind of proxy (true memorization has its own task, shared by all seeds).
PROXY_SOURCES = {"learning_events": _learning_event_scores, "holdout": _holdout_scores}


@cached_task("proxy", run_name="proxy-{proxy}")
def proxy_task(proxy: str, trained: Trained, ckpt: CheckpointRef, data: DataConfig, model: ModelConfig,
               holdout: HoldoutConfig, seed: int, device: str, workdir: str) -> Scores:
    """Scores of one proxy for every training example, on the model `ckpt`."""
    from rumflow.proxies.registry import PROXIES

    compute = PROXY_SOURCES[PROXIES[proxy].source]
    return compute(proxy, trained, ckpt, data, model, holdout, seed, device, workdir)


@cached_task("prepare", run_name="prepare-{spec.method}")
def prepare_task(parent: CheckpointRef, forget: list[int], exclude: list[int] | None, spec: MethodSpec,
                 seed: int | None, data: DataConfig, model: ModelConfig, train: TrainConfig, device: str,
                 workdir: str) -> Unlearned:
    """A method's preparation (masks, importances, teachers) on the parent model, stored like weights.

    The caller passes only what the preparation depends on (`exclude` and `seed` are None otherwise)."""
    from rumflow.methods.registry import prepare_method

    ds = dataset_on(data, device)
    net = model_from_state(model, ds, CheckpointStore.load_state(parent))
    retain = ds.train.drop(exclude) if exclude is not None else ds.train.take([])
    ctx = UnlearnContext(seed=seed or 0, recipe=recipe(train), fresh_model=lambda: fresh_model(model, ds, seed or 0),
                         augment=augments(train, ds), val=ds.val)
    sync(resolve_device(device))
    start = time.perf_counter()
    state = prepare_method(spec.method, spec.params, net, ds.train.take(forget), retain, ctx)
    sync(resolve_device(device))
    return Unlearned(ckpt=_store(workdir).save(state), seconds=time.perf_counter() - start)


@cached_task("memorization", run_name="memorization-R{memorization.models}")
def memorization_task(data: DataConfig, model: ModelConfig, train: TrainConfig, memorization: MemorizationConfig,
                      device: str, workdir: str) -> Scores:
    """True memorization (Feldman & Zhang) of every training example from R models on random subsets."""
    from rumflow.proxies.memorization import estimate_memorization

    ds = dataset_on(data, device)
    r = recipe(train)
    if memorization.epochs is not None:
        r = dataclasses.replace(r, epochs=memorization.epochs)
    scores, info = estimate_memorization(model_spec(model, ds), ds.train, memorization.models, memorization.subset,
                                         r, memorization.seed, augment=augments(train, ds))
    path = _write_scores(workdir, "memorization", ds.train.ids(), {"score": scores})
    return Scores(proxy="memorization", path=path, seconds=info["seconds"])


@cached_task("unlearn", run_name="unlearn-{spec.method}")
def unlearn_task(parent: CheckpointRef, forget: list[int], exclude: list[int], spec: MethodSpec, seed: int,
                 data: DataConfig, model: ModelConfig, train: TrainConfig, device: str, workdir: str,
                 prepared: CheckpointRef | None = None) -> Unlearned:
    """Apply one method to the parent checkpoint: forget `forget`, retain D_train minus `exclude`."""
    ds = dataset_on(data, device)
    net = model_from_state(model, ds, CheckpointStore.load_state(parent))
    state = None if prepared is None else {k: v.to(ds.train.x.device)
                                           for k, v in CheckpointStore.load_state(prepared).items()}
    ctx = UnlearnContext(seed=seed, recipe=recipe(train), fresh_model=lambda: fresh_model(model, ds, seed),
                         augment=augments(train, ds), prepared=state, val=ds.val)
    sync(resolve_device(device))
    start = time.perf_counter()
    net = run_method(spec.method, spec.params, net, ds.train.take(forget), ds.train.drop(exclude), ctx)
    sync(resolve_device(device))
    seconds = time.perf_counter() - start
    return Unlearned(ckpt=_store(workdir).save(net), seconds=seconds)


@cached_task("evaluate", run_name="evaluate-step{plan.step}")
def evaluate_task(ckpt: CheckpointRef, plan: StepPlan, data: DataConfig, model: ModelConfig,
                  evaluate: EvaluateConfig, seed: int, device: str) -> dict[str, Any]:
    """Accuracies and MIA of one checkpoint against one step's plan."""
    ds = dataset_on(data, device)
    net = model_from_state(model, ds, CheckpointStore.load_state(ckpt))
    return evaluate_model(net, ds, plan, evaluate, seed)


@cached_task("forgetting-quality", run_name="forgetting-quality")
def forgetting_quality_task(unlearned: list[CheckpointRef], retrained: list[CheckpointRef], plan: StepPlan,
                            data: DataConfig, model: ModelConfig, device: str) -> dict[str, Any]:
    """Forgetting quality F and the challenge's final score from N unlearned and N retrained checkpoints."""
    from rumflow.evaluation import forgetting_quality_of

    ds = dataset_on(data, device)
    load = lambda ref: model_from_state(model, ds, CheckpointStore.load_state(ref))  # noqa: E731
    return forgetting_quality_of([load(r) for r in unlearned], [load(r) for r in retrained], ds, plan)
