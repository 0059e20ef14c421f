"""Unlearning tasks: a method's cached preparation, and one unlearning call on a parent model."""
from __future__ import annotations

import time
from typing import Any

from rumflow.config import DataConfig, MethodSpec, ModelConfig, TrainConfig
from rumflow.methods.registry import UnlearnContext, prepare_method, run_method
from rumflow.planning import StepPlan
from rumflow.runtime import augments, dataset_on, fresh_model, model_from_state, recipe
from rumflow.tasks.caching import DATA, MODELS, STORE, TRAINING, cached_task, method_modules
from rumflow.tasks.compute import settle_threads
from rumflow.tasks.refs import Trained, Unlearned, store
from rumflow.training import resolve_device, sync

Model = Trained | Unlearned
SHARED = DATA + MODELS + TRAINING + STORE


def _method_code(inputs: dict[str, Any]) -> tuple[str, ...]:
    return method_modules(inputs["method"] if "method" in inputs else inputs["spec"].method)


@cached_task("prepare", run_name="prepare {label}", code=SHARED, code_of=_method_code)
def prepare_task(parent: Model, method: str, params: dict[str, Any], plan: StepPlan, stage: str,
                 policy: str | None, seed: int | None, data: DataConfig, model: ModelConfig, train: TrainConfig,
                 device: str, workdir: str, label: str = "") -> Unlearned:
    """Method `method`'s preparation (masks, importances, teachers) on the parent model, stored like weights.

    The key holds only what the preparation depends on: the caller passes the hyperparameters it names,
    the retain policy only when it uses D_r (None otherwise), the seed only when it draws (None otherwise)."""
    from rumflow.methods.registry import get_method

    settle_threads()
    ds = dataset_on(data, device)
    net = model_from_state(model, ds, store(workdir).load_state(parent.ckpt))
    retain = ds.train.drop(plan.excluded_from_retain(stage, policy)) if policy is not None else ds.train.take([])
    full = get_method(method).params.model_validate(params) if params is not None else None
    ctx = UnlearnContext(seed=seed or 0, recipe=recipe(train), fresh_model=lambda: fresh_model(model, ds, seed or 0),
                         augment=augments(train, ds), val=ds.val)
    sync(resolve_device(device))
    start = time.perf_counter()
    state = prepare_method(method, full, net, ds.train.take(plan.tier(stage)), retain, ctx)
    sync(resolve_device(device))
    return Unlearned(ckpt=store(workdir).save(state), seconds=time.perf_counter() - start)


@cached_task("unlearn", run_name="unlearn {label}", code=SHARED, code_of=_method_code)
def unlearn_task(parent: Model, plan: StepPlan, stage: str, policy: str, spec: MethodSpec, seed: int,
                 data: DataConfig, model: ModelConfig, train: TrainConfig, device: str, workdir: str,
                 prepared: Unlearned | None = None, label: str = "") -> Unlearned:
    """Apply one method to the parent: forget tier `stage` of `plan`, retain what `policy` keeps.

    Its seconds include the preparation's, so RTE counts all the work the method needed."""
    settle_threads()
    ds = dataset_on(data, device)
    runs = store(workdir)
    net = model_from_state(model, ds, runs.load_state(parent.ckpt))
    state = None if prepared is None else {k: v.to(ds.train.x.device)
                                           for k, v in runs.load_state(prepared.ckpt).items()}
    ctx = UnlearnContext(seed=seed, recipe=recipe(train), fresh_model=lambda: fresh_model(model, ds, seed),
                         augment=augments(train, ds), prepared=state, val=ds.val)
    forget, retain = ds.train.take(plan.tier(stage)), ds.train.drop(plan.excluded_from_retain(stage, policy))
    sync(resolve_device(device))
    start = time.perf_counter()
    net = run_method(spec.method, spec.params, net, forget, retain, ctx)
    sync(resolve_device(device))
    seconds = time.perf_counter() - start + (prepared.seconds if prepared is not None else 0.0)
    return Unlearned(ckpt=runs.save(net), seconds=seconds, examples=int(ctx.stats.get("examples", 0)))
