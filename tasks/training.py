"""Training tasks: the original model (recording the learning events), the retrain references, and the
true-memorization estimate."""
from __future__ import annotations

import dataclasses

from rumflow.config import DataConfig, MemorizationConfig, ModelConfig, TrainConfig
from rumflow.planning import StepPlan
from rumflow.proxies.learning_events import LEARNING_EVENTS
from rumflow.runtime import augments, dataset_on, fresh_model, model_spec, recipe
from rumflow.tasks.caching import DATA, MODELS, STORE, TRAINING, cached_task
from rumflow.tasks.compute import settle_threads
from rumflow.tasks.refs import Scores, Trained, store, write_scores
from rumflow.training import train_model


@cached_task("train", run_name="train {label}", code=DATA + MODELS + TRAINING + STORE)
def train_task(data: DataConfig, model: ModelConfig, train: TrainConfig, seed: int, plan: StepPlan | None,
               record_events: bool, device: str, workdir: str, label: str = "") -> Trained:
    """Train from scratch on D_train minus everything `plan` has forgotten (all of D_train without a plan)."""
    settle_threads()
    ds = dataset_on(data, device)
    split = ds.train.drop(plan.forgotten) if plan is not None else ds.train
    net = fresh_model(model, ds, seed)
    result = train_model(net, split, recipe(train), seed=seed, augment=augments(train, ds),
                         record_events=record_events)
    ref = store(workdir).save(net)
    events = None
    if result.events is not None:
        cols = result.events.cpu().numpy()
        events = write_scores(workdir, "learning-events", split.ids(),
                              {name: cols[:, i] for i, name in enumerate(LEARNING_EVENTS)})
    return Trained(ckpt=ref, seconds=result.seconds, events=events, events_seconds=result.events_seconds)


@cached_task("memorization", run_name="memorization {label}",
             code=DATA + MODELS + TRAINING + STORE + ("rumflow.proxies.memorization",))
def memorization_task(data: DataConfig, model: ModelConfig, train: TrainConfig, memorization: MemorizationConfig,
                      device: str, workdir: str, label: str = "") -> Scores:
    """True memorization (Feldman & Zhang) of every training example from R models on random subsets."""
    from rumflow.proxies.memorization import estimate_memorization

    settle_threads()
    ds = dataset_on(data, device)
    r = recipe(train)
    if memorization.epochs is not None:
        r = dataclasses.replace(r, epochs=memorization.epochs)
    scores, info = estimate_memorization(model_spec(model, ds), ds.train, memorization.models, memorization.subset,
                                         r, memorization.seed, augment=augments(train, ds))
    path = write_scores(workdir, "memorization", ds.train.ids(), {"score": scores})
    return Scores(proxy="memorization", path=path, seconds=info["seconds"])
