"""Turning config sections into the live objects the work needs (data on a device, models, recipes)."""
from __future__ import annotations

from functools import lru_cache

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


def check_feasible(cfg: ExperimentConfig) -> Dataset:
    """Checks that need the data (request size, image size for the model), before any expensive work."""
    from rumflow.models import check_input_size
    from rumflow.planning import check_request

    ds = dataset_on(cfg.data, cfg.device)
    check_request(len(ds.train), cfg.forget.steps, cfg.forget.per_tier)
    check_input_size(cfg.model.name, ds.image_size)
    return ds
