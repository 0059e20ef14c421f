"""Gradient ascent on the forget set, alone (NegGrad) or balanced against the retain set (NegGrad+)."""
from __future__ import annotations

from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.parts import OptimizerName, build_optimizer
from rumflow.methods.registry import (MethodParams, UnlearnContext, epoch_batches, register, register_preset,
                                      retain_count)
from rumflow.training import batches_per_epoch, check_loss, minibatches, sgd


class NegGradParams(MethodParams):
    lr: float = Field(1e-4, gt=0, description="learning rate (constant; very sensitive: SalUn's maintainers "
                      "suggest 5e-4..1e-3 on CIFAR)")
    epochs: int = Field(5, ge=0, description="passes over the forget set (steps_per_epoch forget) or over the "
                        "retain set's batch count (steps_per_epoch retain)")
    steps_per_epoch: Literal["forget", "retain"] = Field(
        "forget", description="forget: an epoch is one pass over D_f (SPEC's GA); retain: an epoch is as many "
        "steps as D_r has batches (within retain_fraction), each on the next batch of a cycled D_f (the "
        "MUFAC benchmark's NegGrad, 001 Alg. 2; the retain batches themselves are never used)")


class _Cycle:
    """Shuffled forget mini-batches, redrawn each time they run out (NegGrad+'s and the benchmark's pairing)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator, device: torch.device):
        self.args = (n, batch_size, gen, device)
        self.batches: list[torch.Tensor] = []

    def next(self) -> torch.Tensor:
        """The next forget batch."""
        if not self.batches:
            self.batches = list(minibatches(*self.args))
        return self.batches.pop(0)


def _forget_batches(forget: Split, retain: Split, p: NegGradParams, gen: torch.Generator, cycle: _Cycle,
                    device: torch.device) -> Iterator[torch.Tensor]:
    """One epoch's forget batches: a pass over D_f, or one cycled batch per retain batch."""
    if p.steps_per_epoch == "forget":
        yield from minibatches(len(forget), p.batch_size, gen, device)
        return
    for _ in range(batches_per_epoch(retain_count(len(retain), p), p.batch_size)):
        yield cycle.next()


@register("neggrad", NegGradParams)
def neggrad(model: nn.Module, forget: Split, retain: Split, p: NegGradParams, ctx: UnlearnContext) -> nn.Module:
    """Gradient ascent on the forget set: minimise -CE(forget) (GA)."""
    gen = ctx.generator()
    device = forget.x.device
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    cycle = _Cycle(len(forget), p.batch_size, gen, device)
    losses = ctx.stats["loss"]
    for epoch in range(p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in _forget_batches(forget, retain, p, gen, cycle, device):
            loss = -F.cross_entropy(model(forget.x[idx]), forget.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "neggrad", epoch))
    return model


register_preset("neggrad_benchmark", "neggrad", "seed 001 §6.2 Alg. 2 (MUFAC benchmark, ndb796)",
                "The MUFAC benchmark's NegGrad: -CE on cycled forget batches, one per retain batch; plain SGD.",
                steps_per_epoch="retain", lr=1e-3, epochs=2, batch_size=64, momentum=0.0, weight_decay=0.0)


class NegGradPlusParams(MethodParams):
    alpha: float = Field(0.99, ge=0, le=1, description="weight of the retain loss; 1 - alpha weighs the forget loss")
    lr: float = Field(0.01, gt=0, description="learning rate (constant)")
    epochs: int = Field(5, ge=0, description="passes over the retain set")
    variant: Literal["rum", "scrub"] = Field(
        "rum", description="rum: train-mode BatchNorm, no pull (RUM's code); scrub: the SCRUB paper's baseline, "
        "BatchNorm in eval mode (running statistics frozen) plus a pull towards the starting weights")
    l2_pull: float = Field(5e-4, ge=0, description="variant scrub only: coefficient c of "
                           "(c / 2) * ||theta - theta_start||^2 added to the loss")


def _freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalises with, and no longer updates, its running stats."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@register("neggrad_plus", NegGradPlusParams)
def neggrad_plus(model: nn.Module, forget: Split, retain: Split, p: NegGradPlusParams,
                 ctx: UnlearnContext) -> nn.Module:
    """alpha * CE(retain batch) - (1 - alpha) * CE(cycled forget batch); an epoch is one pass over D_r."""
    gen = ctx.generator()
    device = retain.x.device
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    scrub = p.variant == "scrub"
    params = [q for q in model.parameters() if q.requires_grad]
    start = [q.detach().clone() for q in params] if scrub else []
    losses = ctx.stats["loss"]
    cycle = _Cycle(len(forget), p.batch_size, gen, device)
    for epoch in range(p.epochs):
        model.train()
        if scrub:
            _freeze_batchnorm(model)
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(retain), p, gen, device):
            fidx = cycle.next()
            loss = (p.alpha * F.cross_entropy(model(retain.x[idx]), retain.y[idx])
                    - (1 - p.alpha) * F.cross_entropy(model(forget.x[fidx]), forget.y[fidx]))
            if scrub and p.l2_pull > 0:
                loss = loss + p.l2_pull / 2 * torch.stack(
                    [(q - q0).pow(2).sum() for q, q0 in zip(params, start)]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, f"neggrad_plus ({p.variant})", epoch))
    return model


class AdvancedNegGradParams(MethodParams):
    lam: float = Field(0.1, ge=0, description="lambda: weight of the forget CE in CE_r - lambda * CE_f "
                       "(003: 0.1; the MUFAC benchmark: 1)")
    optimizer: OptimizerName = Field("adam", description="sgd (with momentum), adam or adamw (weight_decay as "
                                     "each defines it)")
    lr: float = Field(1e-4, gt=0, description="learning rate (constant)")
    epochs: int = Field(1, ge=0, description="passes over the retain set")
    batch_size: int = Field(64, ge=2, description="mini-batch size (retain and forget batches alike)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (optimizer sgd only)")
    weight_decay: float = Field(5e-3, ge=0, description="weight decay (003: 5e-3 with Adam)")


@register("advanced_neggrad", AdvancedNegGradParams, source="seed 003 §4.2 eq. (2); Choi & Na's MUFAC benchmark")
def advanced_neggrad(model: nn.Module, forget: Split, retain: Split, p: AdvancedNegGradParams,
                     ctx: UnlearnContext) -> nn.Module:
    """CE(retain batch) - lambda * CE(cycled forget batch), one step per retain batch (Advanced NegGrad).

    This is neggrad_plus reparametrised: with SGD, advanced_neggrad(lam, lr, weight_decay) gives the same
    weights as neggrad_plus(alpha = 1 / (1 + lam), lr * (1 + lam), weight_decay / (1 + lam)), since
    lr * (CE_r - lam * CE_f) = lr (1 + lam) * (alpha CE_r - (1 - alpha) CE_f). With Adam the loss scale
    cancels, so only alpha = 1 / (1 + lam) carries over. Batches are drawn exactly as neggrad_plus draws
    them, and no pair is skipped (the benchmark skips pairs of unequal size)."""
    gen = ctx.generator()
    device = retain.x.device
    opt = build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay)
    cycle = _Cycle(len(forget), p.batch_size, gen, device)
    losses = ctx.stats["loss"]
    for epoch in range(p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(retain), p, gen, device):
            fidx = cycle.next()
            loss = (F.cross_entropy(model(retain.x[idx]), retain.y[idx])
                    - p.lam * F.cross_entropy(model(forget.x[fidx]), forget.y[fidx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "advanced_neggrad", epoch))
    return model


register_preset("advanced_neggrad_benchmark", "advanced_neggrad", "MUFAC benchmark (ndb796), via seed 003 §4.2",
                "The MUFAC benchmark's Advanced NegGrad: CE_r - CE_f (lambda 1), plain SGD lr 1e-3, 2 epochs.",
                lam=1.0, optimizer="sgd", lr=1e-3, epochs=2, weight_decay=0.0)
