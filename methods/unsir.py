"""UNSIR (Tarun et al. 2023; seed 001 §6.3): error-maximising noise, then impair (train on the noise and a
retain subset at a high learning rate), then repair (train on the retain subset). `unsir` is the paper's
class-wise form; `unsir_instance` is the MUFAC benchmark's per-batch adaptation."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.common import mixed_batches
from rumflow.methods.parts import ForgetStream, OptimizerName, build_optimizer, per_class_subset
from rumflow.methods.registry import MethodParams, Preparation, UnlearnContext, register, retain_sample
from rumflow.training import check_loss, minibatches

Stage = Literal["impair", "repair"]


class UnsirParams(MethodParams):
    lr: float = Field(0.02, gt=0, description="impair learning rate (the paper: Adam 0.02)")
    repair_lr: float = Field(0.01, gt=0, description="repair learning rate (the paper: Adam 0.01)")
    epochs: int = Field(1, ge=0, description="rounds of one impair pass then repair_epochs repair passes")
    repair_epochs: int = Field(1, ge=0, description="repair passes over the retain subset per round (the paper: 1)")
    optimizer: OptimizerName = Field("adam", description="optimizer of both model phases (the paper: adam)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the model's optimizer")
    noise_batch: int = Field(256, ge=1, description="noise images per forget class (all kept: the paper's "
                             "loop keeps only 3, one per channel)")
    noise_lr: float = Field(0.1, gt=0, description="Adam learning rate of the noise")
    noise_epochs: int = Field(5, ge=0, description="epochs of Adam on each class's noise (the paper: 5)")
    noise_steps: int = Field(8, ge=0, description="Adam steps on the noise per noise epoch (the paper: 8)")
    noise_reg: float = Field(0.1, ge=0, description="weight of the noise's mean squared norm in its objective")
    impair_noise_epochs: int = Field(20, ge=0, description="passes over the noise within each impair pass, i.e. "
                                     "the times each noise image appears in it (the paper: 20 copies)")
    max_retain_per_class: int = Field(1000, ge=1, description="the retain subset: at most this many D_r "
                                      "examples per class, a seeded sample drawn once")
    stop_after: Stage = Field("repair", description="return the model after the impair stage or after repair")


class UnsirInstanceParams(MethodParams):
    lr: float = Field(1e-3, gt=0, description="learning rate of the model's optimizer")
    epochs: int = Field(1, ge=0, description="rounds of one impair pass then one repair pass over the retain subset")
    batch_size: int = Field(64, ge=2, description="mini-batch size (each retain image gets a noise image)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the model's optimizer")
    optimizer: OptimizerName = Field("sgd", description="optimizer of the model (the benchmark: SGD, momentum 0.9)")
    noise_steps: int = Field(5, ge=0, description="Adam steps on each batch's noise")
    noise_lr: float = Field(0.01, gt=0, description="Adam learning rate of the noise")
    max_retain_per_class: int = Field(1000, ge=1, description="the retain subset: at most this many D_r "
                                      "examples per class, a seeded sample drawn once")
    stop_after: Stage = Field("repair", description="return the model after the impair stage or after repair")


def _adam_ascent(noise: torch.Tensor, objective, steps: int, lr: float) -> torch.Tensor:
    """Minimise objective(noise) with Adam over the noise only (the model's parameters get no gradient)."""
    noise = noise.clone().requires_grad_(True)
    opt = torch.optim.Adam([noise], lr=lr)
    with torch.enable_grad():  # also when the caller scores under no_grad
        for _ in range(steps):
            (noise.grad,) = torch.autograd.grad(objective(noise), noise)
            opt.step()
    return noise.detach()


def class_noise(model: nn.Module, label: int, start: torch.Tensor, steps: int, lr: float, reg: float) -> torch.Tensor:
    """UNSIR's error-maximising noise for one class: Adam on N minimising -CE(f(N), label) + reg * mean_i ||N_i||^2,
    from `start` (the model's current mode is used; eval for a frozen model)."""
    target = torch.full((start.shape[0],), label, dtype=torch.long, device=start.device)

    def objective(n: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(model(n), target) + reg * n.pow(2).flatten(1).sum(1).mean()

    return _adam_ascent(start, objective, steps, lr)


def instance_noise(model: nn.Module, forget_logits: torch.Tensor, start: torch.Tensor, steps: int,
                   lr: float) -> torch.Tensor:
    """The benchmark's per-batch noise: Adam on N minimising -MSE(f(N), forget logits), i.e. pushing the
    noise's logits away from the forget batch's; returns clamp(N, 0, 1)."""
    return _adam_ascent(start, lambda n: -F.mse_loss(model(n), forget_logits), steps, lr).clamp(0, 1)


def _prepare_noise(model: nn.Module, forget: Split, retain: Split, p: UnsirParams,
                   ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """Class-wise noise for every class present in D_f: {'noise': [K, B, C, H, W], 'noise_labels': [K]}."""
    gen = ctx.generator(1)
    device = forget.x.device
    classes = torch.unique(forget.y).cpu()
    model.eval()
    noise = [class_noise(model, int(c), torch.randn((p.noise_batch, *forget.x.shape[1:]), generator=gen).to(device),
                         p.noise_epochs * p.noise_steps, p.noise_lr, p.noise_reg) for c in classes]
    return {"noise": torch.stack(noise), "noise_labels": classes.to(device)}


def _ce_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One train-mode CE step; returns the detached loss."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _repair(model: nn.Module, opt: torch.optim.Optimizer, retain: Split, pool: torch.Tensor, batch_size: int,
            gen: torch.Generator, what: str, epoch: int) -> float:
    """One pass of CE over the retain examples at positions `pool`."""
    model.train()
    loss_sum, batches = torch.zeros((), device=retain.x.device), 0
    for idx in minibatches(len(pool), batch_size, gen, retain.x.device):
        loss_sum += _ce_step(model, opt, retain.x[pool[idx]], retain.y[pool[idx]])
        batches += 1
    return check_loss(loss_sum, batches, what, epoch)


def _epoch_pool(subset: torch.Tensor, p: MethodParams, gen: torch.Generator) -> torch.Tensor:
    """This epoch's positions in D_r: the retain subset within the retain_fraction budget."""
    sample = retain_sample(len(subset), p, gen)
    return subset if sample is None else subset[sample.to(subset.device)]


@register("unsir", UnsirParams, source="seed 001 §6.3 Alg. 3; Tarun et al. 2023 (vikram2000b/Fast-Machine-Unlearning)",
          prepare=Preparation(_prepare_noise,
                              params=("noise_batch", "noise_lr", "noise_epochs", "noise_steps", "noise_reg"),
                              uses_seed=True))
def unsir(model: nn.Module, forget: Split, retain: Split, p: UnsirParams, ctx: UnlearnContext) -> nn.Module:
    """UNSIR, class-wise: impair on error-maximising noise (labelled with its class) plus a retain subset, then repair.

    The noise is the method's preparation (ctx.prepared: 'noise' [K, B, C, H, W] and 'noise_labels' [K])."""
    prepared = ctx.prepared or {}
    noise, labels = prepared.get("noise"), prepared.get("noise_labels")
    if noise is None or labels is None or tuple(noise.shape[2:]) != tuple(forget.x.shape[1:]):
        raise ValueError("the prepared UNSIR noise is missing or does not match the images; compute it with "
                         "this method's preparation on the model being unlearned.")
    gen = ctx.generator()
    device = retain.x.device
    flat_noise, flat_labels = noise.flatten(0, 1), labels.repeat_interleave(noise.shape[1])
    n_noise = len(flat_noise) * p.impair_noise_epochs
    subset = per_class_subset(retain.y, p.max_retain_per_class, gen)
    impair_opt = build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay)
    repair_opt = build_optimizer(model, p.optimizer, p.repair_lr, p.momentum, p.weight_decay)
    losses, impair_losses = ctx.stats["loss"], ctx.stats.setdefault("impair_loss", [])
    ctx.stats["impair_examples"] = 0
    for epoch in range(p.epochs):
        pool = _epoch_pool(subset, p, gen)
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for nidx, ridx in mixed_batches(n_noise, len(pool), p.batch_size, gen, device):
            nidx = nidx % len(flat_noise)  # copies of the noise by index, not by tensor
            x = torch.cat([flat_noise[nidx], retain.x[pool[ridx]]])
            y = torch.cat([flat_labels[nidx], retain.y[pool[ridx]]])
            loss_sum += _ce_step(model, impair_opt, x, y)
            batches += 1
        impair_losses.append(check_loss(loss_sum, batches, "unsir (impair)", epoch))
        ctx.stats["impair_examples"] += n_noise + len(pool)
        if p.stop_after == "repair" and p.repair_epochs > 0:
            for _ in range(p.repair_epochs):
                repair = _repair(model, repair_opt, retain, pool, p.batch_size, gen, "unsir (repair)", epoch)
            losses.append(repair)
        else:
            losses.append(impair_losses[-1])
    return model


@register("unsir_instance", UnsirInstanceParams,
          source="seed 001 §6.3 (MUFAC benchmark adaptation, ndb796/MachineUnlearning)")
def unsir_instance(model: nn.Module, forget: Split, retain: Split, p: UnsirInstanceParams,
                   ctx: UnlearnContext) -> nn.Module:
    """UNSIR, instance-wise: per retain batch, noise pushed away from a forget batch's logits, then a step on
    CE(noise, retain labels) + CE(retain); then repair on the retain subset.

    The noise depends on the model as it changes, so it is made in the loop (eval mode), not prepared."""
    gen = ctx.generator()
    device = retain.x.device
    subset = per_class_subset(retain.y, p.max_retain_per_class, gen)
    stream = ForgetStream(len(forget), gen, device)
    opt = build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay)
    losses, impair_losses = ctx.stats["loss"], ctx.stats.setdefault("impair_loss", [])
    for epoch in range(p.epochs):
        pool = _epoch_pool(subset, p, gen)
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in minibatches(len(pool), p.batch_size, gen, device):
            x_r, y_r = retain.x[pool[idx]], retain.y[pool[idx]]
            model.eval()
            with torch.no_grad():
                z_f = model(forget.x[stream.take(int(idx.shape[0]))])
            start = torch.randn(tuple(x_r.shape), generator=gen).to(device)
            x_n = instance_noise(model, z_f, start, p.noise_steps, p.noise_lr)
            model.train()
            loss = F.cross_entropy(model(x_n), y_r) + F.cross_entropy(model(x_r), y_r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        impair_losses.append(check_loss(loss_sum, batches, "unsir_instance (impair)", epoch))
        if p.stop_after == "repair":
            losses.append(_repair(model, opt, retain, pool, p.batch_size, gen, "unsir_instance (repair)", epoch))
        else:
            losses.append(impair_losses[-1])
    return model
