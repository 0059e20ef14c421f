"""Turning config sections into the live objects the work needs (data on a device, models, recipes)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from rumflow.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from rumflow.data import Dataset, load_dataset
from rumflow.models import ModelSpec, create_model, restore_activation_masks
from rumflow.training import FastPath, Recipe, resolve_device


@lru_cache(maxsize=4)
def dataset_on(data: DataConfig, device: str = "auto") -> Dataset:
    """The data set of `data`, whole, on the resolved device (loaded once per process)."""
    ds = load_dataset(data.name, data.root, data.split_seed, data.download)
    return ds.to(resolve_device(device))


def model_spec(model: ModelConfig, ds: Dataset) -> ModelSpec:
    """The spec that rebuilds `model` for this data set."""
    return ModelSpec(model.name, ds.num_classes, ds.in_channels, ds.mean, ds.std)


def recipe(train: TrainConfig) -> Recipe:
    """The optimiser recipe of the original model (and of every retrain reference)."""
    return Recipe(train.epochs, train.lr, train.batch_size, train.momentum, train.weight_decay,
                  fast=FastPath(train.precision, train.channels_last, train.compile))


def augments(train: TrainConfig, ds: Dataset) -> bool:
    """Crop+flip when asked, by default for 32x32 images only."""
    return ds.image_size == 32 if train.augment is None else train.augment


def fresh_model(model: ModelConfig, ds: Dataset, seed: int) -> nn.Module:
    """A newly initialised model on the data set's device."""
    return create_model(model_spec(model, ds), seed=seed).to(ds.train.x.device)


def model_from_state(model: ModelConfig, ds: Dataset, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of `model`'s architecture holding the given weights, on the data set's device."""
    net = create_model(model_spec(model, ds))
    restore_activation_masks(net, state)  # activation_pruning's masks: buffers + hooks, before loading them
    net.load_state_dict(state)
    return net.to(ds.train.x.device)


def check_device(name: str) -> None:
    """ConfigError (one sentence) unless the device exists on this machine."""
    from rumflow.errors import ConfigError

    if name in ("auto", "cpu"):
        return
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("device 'mps' was asked for but this machine has no Apple GPU; use --set "
                              "device=auto or device=cpu.")
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but this machine has no usable CUDA GPU; use --set "
                          "device=auto or device=cpu.")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device '{name}' does not exist: this machine has {count} CUDA GPU(s), "
                          f"cuda:0 to cuda:{count - 1}; pick one of them or use --set device=cuda.")


def _failing_file(exc: BaseException) -> str | None:
    """The file a reader was working on when it failed (its `path` local), to name it in the error."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        value = tb.tb_frame.f_locals.get("path")
        if isinstance(value, (str, Path)):
            found = str(value)
        tb = tb.tb_next
    return found


def load_checked(data: DataConfig, device: str) -> Dataset:
    """The data set, with any reader failure (a damaged gzip, a truncated file) as one DataError."""
    from rumflow.errors import DataError, RumflowError

    try:
        return dataset_on(data, device)
    except RumflowError:
        raise
    except Exception as exc:  # zlib.error, EOFError, OSError, ValueError from a damaged file
        where = _failing_file(exc) or (data.root or data.name)
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the {data.name} data in {where} cannot be read ({type(exc).__name__}: {reason}); the "
                        "file is damaged or truncated: replace it with a fresh copy (or set data.download: "
                        "true to fetch it again).") from exc


def check_feasible(cfg: ExperimentConfig) -> Dataset:
    """Checks that need the machine or the data (the device exists, the files read, the request fits, the
    image size suits the model), before any expensive work."""
    from rumflow.models import check_input_size
    from rumflow.planning import check_request

    check_device(cfg.device)
    ds = load_checked(cfg.data, cfg.device)
    check_request(len(ds.train), cfg.forget.steps, cfg.forget.per_tier)
    check_input_size(cfg.model.name, ds.image_size)
    return ds
