"""Pieces the seed documents' methods share: the optimizer choice, a cycled stream of forget partners,
class-capped retain subsets, and penultimate features."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

from rumflow.errors import ConfigError

OptimizerName = Literal["sgd", "adam", "adamw"]


def build_optimizer(model: nn.Module, name: OptimizerName, lr: float, momentum: float = 0.0,
                    weight_decay: float = 0.0, params: list[torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """SGD (with `momentum`), Adam (L2 `weight_decay`) or AdamW (decoupled) over the model being returned."""
    chosen = list(model.parameters()) if params is None else params
    if name == "sgd":
        return torch.optim.SGD(chosen, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(chosen, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(chosen, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer '{name}'; choose sgd, adam or adamw.")


class ForgetStream:
    """Forget-set positions handed out in a cycled, reshuffled order, as many as each retain batch needs.

    Every retain example gets a forget partner, so no pair is ever skipped for unequal sizes (the seed
    code's `if x_forget.size(0) != x_retain.size(0): continue`); a forget set smaller than a batch repeats."""

    def __init__(self, n: int, gen: torch.Generator, device: torch.device):
        self.n, self.gen, self.device = n, gen, device
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        """The next k positions (on the device); the order is redrawn each time the set is used up."""
        parts, need = [], k
        while need > 0:
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
            chunk = self.order[self.pos:self.pos + need]
            parts.append(chunk)
            self.pos += len(chunk)
            need -= len(chunk)
        return torch.cat(parts).to(self.device)


def per_class_subset(y: torch.Tensor, cap: int, gen: torch.Generator) -> torch.Tensor:
    """Positions (on y's device) of a seeded random sample of at most `cap` examples per class, sorted."""
    perm = torch.randperm(len(y), generator=gen).to(y.device)
    ys = y[perm]
    order = torch.argsort(ys, stable=True)  # grouped by class, random order within each class
    sorted_y = ys[order]
    first = torch.searchsorted(sorted_y, sorted_y, right=False)  # start of each example's class run
    rank = torch.arange(len(y), device=y.device) - first
    return torch.sort(perm[order][rank < cap]).values


def _head_linear(model: nn.Module) -> nn.Module:
    """The model's final linear layer: the last nn.Linear of its head block (of the whole model otherwise)."""
    scope = model
    if getattr(model, "arch", None) is not None:
        from rumflow.models import blocks

        scope = blocks(model)[-1][1]
    linears = [m for m in scope.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("penultimate features need a final nn.Linear layer, and this model has none; "
                          "use feature_space: logits.")
    return linears[-1]


@contextmanager
def capture_penultimate(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, each forward pass of `model` appends the input of its final linear layer to the list."""
    seen: list[torch.Tensor] = []
    handle = _head_linear(model).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def forward_features(model: nn.Module, x: torch.Tensor, space: Literal["logits", "penultimate"]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of one forward pass; features are the logits or the final layer's input."""
    if space == "logits":
        logits = model(x)
        return logits, logits
    with capture_penultimate(model) as seen:
        logits = model(x)
    return logits, seen[-1].flatten(1)
