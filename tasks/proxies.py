"""Proxy tasks: one memorization proxy's scores for every training example."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from rumflow.config import DataConfig, HoldoutConfig, ModelConfig
from rumflow.runtime import dataset_on, model_from_state
from rumflow.tasks.caching import DATA, MODELS, STORE, TRAINING, cached_task
from rumflow.tasks.compute import settle_threads
from rumflow.tasks.refs import Scores, Trained, Unlearned, store, write_scores
from rumflow.training import resolve_device, sync


def _learning_event_scores(proxy: str, trained: Trained, parent: Trained | Unlearned, data: DataConfig,
                           model: ModelConfig, holdout: HoldoutConfig, seed: int, device: str,
                           workdir: str) -> Scores:
    """One column of the events recorded while the original model trained (cost: the recording time)."""
    events = pd.read_parquet(f"{workdir}/{trained.events}")
    path = write_scores(workdir, proxy, events["example_id"].to_numpy(), {"score": events[proxy].to_numpy()})
    return Scores(proxy=proxy, path=path, seconds=trained.events_seconds)


def _holdout_scores(proxy: str, trained: Trained, parent: Trained | Unlearned, data: DataConfig, model: ModelConfig,
                    holdout: HoldoutConfig, seed: int, device: str, workdir: str) -> Scores:
    """Symmetric KL between the model `parent` and a copy of it fine-tuned on the held-out split."""
    from rumflow.proxies.holdout import holdout_retraining

    ds = dataset_on(data, device)
    net = model_from_state(model, ds, store(workdir).load_state(parent.ckpt))
    sync(resolve_device(device))
    start = time.perf_counter()
    scores = holdout_retraining(net, ds.train, getattr(ds, holdout.split), holdout,
                                generator=torch.Generator().manual_seed(seed))
    sync(resolve_device(device))
    seconds = time.perf_counter() - start
    path = write_scores(workdir, proxy, ds.train.ids(), {"score": np.asarray(scores)})
    return Scores(proxy=proxy, path=path, seconds=seconds)


# How proxy_task computes each kind of proxy (true memorization has its own task, shared by all seeds).
PROXY_SOURCES = {"learning_events": _learning_event_scores, "holdout": _holdout_scores}


@cached_task("proxy", run_name="proxy {label}",
             code=DATA + MODELS + TRAINING + STORE + ("rumflow.proxies.registry", "rumflow.proxies.holdout"))
def proxy_task(proxy: str, trained: Trained, parent: Trained | Unlearned, data: DataConfig, model: ModelConfig,
               holdout: HoldoutConfig, seed: int, device: str, workdir: str, label: str = "") -> Scores:
    """Scores of one proxy for every training example, on the model `parent`."""
    from rumflow.proxies.registry import PROXIES

    settle_threads()
    compute = PROXY_SOURCES[PROXIES[proxy].source]
    return compute(proxy, trained, parent, data, model, holdout, seed, device, workdir)
