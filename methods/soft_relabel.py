"""Soft relabelling (seed 004 §3.1): each forget example's label becomes the similarity-weighted mix of the
labels of the retain examples in its batch, as seen by the frozen original model; then fine-tuning on D_r."""
from __future__ import annotations

import copy
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.errors import ConfigError
from rumflow.methods.common import num_classes
from rumflow.methods.parts import OptimizerName, build_optimizer
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register
from rumflow.training import check_loss, minibatches


class SoftRelabelParams(MethodParams):
    lr: float = Field(1e-3, gt=0, description="learning rate (constant; both phases)")
    epochs: int = Field(28, ge=0, description="total epochs: the first relabel_epochs are relabelling passes over "
                        "D_f (each forget batch paired with the next retain batch), the rest fine-tune on D_r "
                        "(004: 20 + 8)")
    relabel_epochs: int = Field(20, ge=0, description="how many of the epochs, counted from the first, relabel D_f")
    similarity_space: Literal["orig_logits", "orig_penultimate"] = Field(
        "orig_logits", description="where distances are measured: the frozen original model's logits (004's "
        "code) or the input of its last linear layer")
    temperature: float = Field(1.0, gt=0, description="softmax temperature on the negative Euclidean distances")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy (both phases)")
    optimizer: OptimizerName = Field("adamw", description="optimizer over both phases (004: AdamW)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer sgd only)")


def soft_labels(h_forget: torch.Tensor, h_retain: torch.Tensor, y_retain: torch.Tensor, classes: int,
                temperature: float = 1.0) -> torch.Tensor:
    """Row i: sum_j softmax_j(-||h_i - h_j||_2 / T) e_{y_j} over the retain examples j (004's masked attention)."""
    dist = torch.cdist(h_forget.float(), h_retain.float(), compute_mode="donot_use_mm_for_euclid_dist")
    weights = torch.softmax(-dist / temperature, dim=1)
    return weights @ F.one_hot(y_retain, classes).to(weights.dtype)


class _Features:
    """The frozen original model's representation in `space` (logits, or the last linear layer's input)."""

    def __init__(self, model: nn.Module, space: str):
        self.net = copy.deepcopy(model).eval().requires_grad_(False)
        self.captured: torch.Tensor | None = None
        if space == "orig_penultimate":
            heads = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
            if not heads:
                raise ConfigError("similarity_space orig_penultimate needs a model with a linear head; use "
                                  "orig_logits for this model.")
            heads[-1].register_forward_pre_hook(self._capture)
        self.space = space

    def _capture(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.captured = args[0].flatten(1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return self.captured if self.space == "orig_penultimate" else out


def _cycled(n: int, p: SoftRelabelParams, gen: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Retain batches forever: a new budgeted epoch of D_r whenever one runs out (never the forget set)."""
    while True:
        yield from epoch_batches(n, p, gen, device)


@register("soft_relabel", SoftRelabelParams, source="seed 004 §3.1; trainer.py NNTrainer")
def soft_relabel(model: nn.Module, forget: Split, retain: Split, p: SoftRelabelParams,
                 ctx: UnlearnContext) -> nn.Module:
    """CE on [retain batch; forget batch] with forget labels softened by retain similarity, then CE on D_r."""
    if len(retain) == 0:
        raise ConfigError("soft_relabel builds forget labels from retain examples but the retain set is empty; "
                          "use another method for this request.")
    gen = ctx.generator()
    device = retain.x.device
    classes = num_classes(model, forget.x)
    features = _Features(model, p.similarity_space)
    opt = build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay)  # over the returned model
    retain_batches = _cycled(len(retain), p, gen, device)
    losses = ctx.stats["loss"]
    n_relabel = min(p.relabel_epochs, p.epochs)
    for epoch in range(p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        if epoch < n_relabel:
            for fidx in minibatches(len(forget), p.batch_size, gen, device):
                ridx = next(retain_batches)
                x_f, x_r, y_r = forget.x[fidx], retain.x[ridx], retain.y[ridx]
                target = soft_labels(features(x_f), features(x_r), y_r, classes, p.temperature)
                target = torch.cat([F.one_hot(y_r, classes).to(target.dtype), target])
                loss = F.cross_entropy(model(torch.cat([x_r, x_f])), target, label_smoothing=p.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                batches += 1
            losses.append(check_loss(loss_sum, batches, "soft_relabel (relabel)", epoch))
        else:
            for idx in epoch_batches(len(retain), p, gen, device):
                loss = F.cross_entropy(model(retain.x[idx]), retain.y[idx], label_smoothing=p.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                batches += 1
            losses.append(check_loss(loss_sum, batches, "soft_relabel (fine-tune)", epoch))
    ctx.stats["relabel_epochs"] = n_relabel
    return model
