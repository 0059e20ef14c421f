"""Data sets held whole in memory as tensors, keyed by a stable `example_id`."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from rumflow.registry import Registry


@dataclass(frozen=True)
class Split:
    """Examples of one split: raw images `x` (float, [N,C,H,W]), labels `y`, ids; sorted by id."""

    x: torch.Tensor
    y: torch.Tensor
    example_id: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @staticmethod
    def make(x: torch.Tensor, y: torch.Tensor, example_id: torch.Tensor) -> "Split":
        """Build a split sorted by example_id, so lookups by id are a binary search."""
        order = torch.argsort(example_id)
        return Split(x[order].contiguous(), y[order].long(), example_id[order].long())

    def positions(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Row positions of `ids`; raises if any id is not in this split."""
        ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=self.example_id.device)
        pos = torch.searchsorted(self.example_id, ids_t).clamp_(max=max(len(self) - 1, 0))
        if len(self) == 0 or not torch.equal(self.example_id[pos], ids_t):
            raise KeyError("some example ids are not in this split")
        return pos

    def take(self, ids: np.ndarray | torch.Tensor) -> "Split":
        """The examples with these ids (in id order)."""
        ids_np = np.unique(np.asarray(ids, dtype=np.int64))
        pos = self.positions(ids_np)
        return Split(self.x[pos], self.y[pos], self.example_id[pos])

    def drop(self, ids: np.ndarray | torch.Tensor) -> "Split":
        """The examples whose ids are not in `ids`."""
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.example_id.device)
        keep = ~torch.isin(self.example_id, ids_t)
        return Split(self.x[keep], self.y[keep], self.example_id[keep])

    def to(self, device: torch.device | str) -> "Split":
        """This split on `device`."""
        return Split(self.x.to(device), self.y.to(device), self.example_id.to(device))

    def ids(self) -> np.ndarray:
        """The example ids as a numpy array."""
        return self.example_id.cpu().numpy()


@dataclass(frozen=True)
class Dataset:
    """Train/val/test splits plus what a model needs to know about the inputs."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    def to(self, device: torch.device | str) -> "Dataset":
        """This data set on `device`."""
        return Dataset(self.name, self.train.to(device), self.val.to(device), self.test.to(device),
                       self.num_classes, self.mean, self.std)


Loader = Callable[..., Dataset]
DATASETS: Registry[Loader] = Registry("data set")


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register a loader `f(root, split_seed, download) -> Dataset` under `name`."""
    return DATASETS.register(name)


def balanced_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (keep, holdout) with a class-balanced `fraction` held out, seeded."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = int(round(fraction * len(members)))
        held.append(rng.choice(members, size=n, replace=False))
    holdout = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(len(labels)), holdout)
    return keep, holdout


@register_dataset("digits")
def load_digits_dataset(root: str | None = None, split_seed: int = 0, download: bool = False) -> Dataset:
    """scikit-learn's embedded 8x8 digits, stratified 70/10/20 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    ids = np.arange(len(y))
    train_ids, rest = train_test_split(ids, train_size=0.7, stratify=bunch.target, random_state=split_seed)
    val_ids, test_ids = train_test_split(rest, test_size=2 / 3, stratify=bunch.target[rest],
                                         random_state=split_seed)
    splits = [Split.make(x[i], y[i], torch.as_tensor(i)) for i in (train_ids, val_ids, test_ids)]
    mean = float(splits[0].x.mean())
    std = float(splits[0].x.std())
    return Dataset("digits", *splits, num_classes=10, mean=(mean,), std=(std,))


@lru_cache(maxsize=4)
def load_dataset(name: str, root: str | None = None, split_seed: int = 0, download: bool = False) -> Dataset:
    """Load (once per process) the data set `name`; see DATASETS for the choices."""
    return DATASETS.get(name)(root=root, split_seed=split_seed, download=download)


# The torchvision-format readers (cifar10, cifar100, mnist) register themselves on import.
from rumflow import readers  # noqa: E402,F401
