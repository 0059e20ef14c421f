"""Seed 000's gradient-reversal family as one engine, `ascent_schedule`, and its seven notebook presets.

"Gradient reversal" in 000 is scaled gradient ascent on the forget set: a step on -scale(e) * CE(f(x_f), y_f).
The engine's options are the notebook's algorithms' differences: a fine-tune before the loop, the
alternation pattern (forget passes only, a retain pass then a forget pass, or interleaved batches with k
forget steps per retain step), the schedule of the scale (constant, linear, quadratic), intermediate and
final retain fine-tunes, the trainable set (with a real unfreeze), and best-on-validation selection.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.errors import ConfigError
from rumflow.methods.basic import make_optimizer, retain_epoch
from rumflow.methods.layers import Freeze, TrainableSet, choose_blocks
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register, register_preset
from rumflow.models import blocks
from rumflow.training import accuracy, batches_per_epoch, check_loss, minibatches


class AscentParams(MethodParams, TrainableSet):
    """Seed 000's machinery: SGD lr 0.001, momentum 0.9, wd 5e-4, batch 128; defaults of its Algorithm 5."""

    lr: float = Field(0.001, gt=0, description="learning rate (constant in the loop)")
    epochs: int = Field(100, ge=0, description="epochs of the ascent loop (what one epoch is depends on "
                        "pattern)")
    batch_size: int = Field(128, ge=2, description="mini-batch size (retain and forget)")
    scale: float = Field(0.5, ge=0, description="magnitude of the reverse scale: forget steps minimise "
                         "-scale(e) * CE (the notebook's reverse_scale is -scale)")
    schedule: Literal["constant", "linear", "quadratic"] = Field(
        "constant", description="scale(e) over the loop's epochs e = 0..epochs-1: constant, scale*e/epochs, "
        "or scale*(e/epochs)^2")
    pattern: Literal["forget", "epoch", "batch"] = Field(
        "batch", description="forget: each epoch is one ascent pass over D_f; epoch: a retain pass, then an "
        "ascent pass over D_f; batch: each retain step is followed by forget_steps ascent steps")
    forget_steps: int = Field(1, ge=1, description="pattern batch: ascent steps after each retain step")
    steps: Literal["min", "retain"] = Field(
        "min", description="pattern batch: retain steps per epoch, min(retain batches, forget batches) or "
        "every retain batch")
    cycle_forget: bool = Field(False, description="pattern batch: restart the forget pass when it runs out "
                               "within an epoch (False: ascent stops for the rest of the epoch, as in 000)")
    pre_epochs: int = Field(0, ge=0, description="retain fine-tune epochs before the loop (own optimizer, "
                            "cosine lr over them: 000's selective_fine_tune inside Algorithms 3 and 4)")
    intermediate_every: int = Field(0, ge=0, description="one extra retain pass after every n-th loop epoch "
                                    "(0 = never)")
    final_epochs: int = Field(0, ge=0, description="retain fine-tune epochs after the loop, with the loop's "
                              "optimizer (its momentum kept)")
    unfreeze_at: float | None = Field(None, ge=0, le=1, description="fraction of the loop after which the "
                                      "blocks in `unfreeze` become trainable (added to the optimizer)")
    unfreeze: tuple[str, ...] = Field((), description="frozen blocks to make trainable at unfreeze_at")
    select: Literal["none", "val_acc"] = Field(
        "none", description="val_acc: keep the loop epoch with the best validation accuracy (a copy of its "
        "state) before the final fine-tune; off when the context has no validation split")


def reverse_scale(p: AscentParams, epoch: int) -> float:
    """The ascent weight of loop epoch `epoch` (0-based; linear and quadratic never reach `scale`)."""
    frac = epoch / max(p.epochs, 1)
    return p.scale * {"constant": 1.0, "linear": frac, "quadratic": frac ** 2}[p.schedule]


class Sums:
    """One epoch's loss sums on the device (one host sync per epoch, in `check`)."""

    def __init__(self, device: torch.device):
        self.objective = torch.zeros((), device=device)
        self.forget_ce = torch.zeros((), device=device)
        self.steps = 0
        self.forget_steps = 0

    def add_retain(self, loss_sum: torch.Tensor, batches: int) -> None:
        self.objective = self.objective + loss_sum
        self.steps += batches

    def add_forget(self, ce: torch.Tensor, scale: float) -> None:
        self.objective = self.objective - scale * ce
        self.forget_ce = self.forget_ce + ce
        self.steps += 1
        self.forget_steps += 1


def ascent_step(model: nn.Module, forget: Split, idx: torch.Tensor, scale: float,
                opt: torch.optim.Optimizer) -> torch.Tensor:
    """One step on -scale * CE of a forget batch; returns the batch's CE (detached)."""
    ce = F.cross_entropy(model(forget.x[idx]), forget.y[idx])
    opt.zero_grad(set_to_none=True)
    (-scale * ce).backward()
    opt.step()
    return ce.detach()


def forget_pass(model: nn.Module, forget: Split, p: AscentParams, scale: float, opt: torch.optim.Optimizer,
                gen: torch.Generator, fz: Freeze, sums: Sums) -> None:
    """One shuffled ascent pass over D_f, in train mode."""
    fz.train()
    for idx in minibatches(len(forget), p.batch_size, gen, forget.x.device):
        sums.add_forget(ascent_step(model, forget, idx, scale, opt), scale)


def interleaved_pass(model: nn.Module, forget: Split, retain: Split, p: AscentParams, scale: float,
                     opt: torch.optim.Optimizer, gen: torch.Generator, fz: Freeze, sums: Sums) -> None:
    """Retain steps, each followed by `forget_steps` ascent steps on the next forget batches."""
    fz.train()
    device = retain.x.device
    retain_batches = list(epoch_batches(len(retain), p, gen, device))
    n = len(retain_batches)
    if p.steps == "min":
        n = min(n, batches_per_epoch(len(forget), p.batch_size))
    forget_iter = iter(minibatches(len(forget), p.batch_size, gen, device))
    for idx in retain_batches[:n]:
        loss = F.cross_entropy(model(retain.x[idx]), retain.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums.add_retain(loss.detach(), 1)
        for _ in range(p.forget_steps):
            fidx = next(forget_iter, None)
            if fidx is None and p.cycle_forget:
                forget_iter = iter(minibatches(len(forget), p.batch_size, gen, device))
                fidx = next(forget_iter)
            if fidx is None:
                break
            sums.add_forget(ascent_step(model, forget, fidx, scale, opt), scale)


def check_unfreeze(model: nn.Module, p: AscentParams) -> None:
    """Stop early when `unfreeze` names a block the model does not have."""
    if not p.unfreeze:
        return
    if p.unfreeze_at is None:
        raise ConfigError(f"unfreeze names {', '.join(p.unfreeze)} but unfreeze_at is not set; set unfreeze_at "
                          "(a fraction of the loop's epochs, e.g. 0.3) or drop unfreeze.")
    names = [n for n, _ in blocks(model)]
    unknown = [u for u in p.unfreeze if u not in names]
    if unknown:
        raise ConfigError(f"model {model.arch} has no block {', '.join(unknown)}; its blocks are: "
                          f"{', '.join(names)}; fix 'unfreeze' in the config.")


@register("ascent_schedule", AscentParams, source="seed 000 Alg. 3-6 and Hybrid Models 1-4 (one engine)")
def ascent_schedule(model: nn.Module, forget: Split, retain: Split, p: AscentParams,
                    ctx: UnlearnContext) -> nn.Module:
    """Scaled gradient ascent on D_f alternated with CE on D_r, on a schedule (seed 000's family)."""
    gen = ctx.generator()
    device = retain.x.device
    chosen = choose_blocks(model, p.trainable, p.last_k)
    check_unfreeze(model, p)
    stats = ctx.stats
    losses = stats["loss"]
    for key in ("forget_ce", "scale", "val_acc"):
        stats.setdefault(key, [])
    with Freeze(model, chosen, p.frozen_bn) as fz:
        if p.pre_epochs:
            pre_opt = make_optimizer(fz.params, p)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(pre_opt, T_max=p.pre_epochs)
            for epoch in range(p.pre_epochs):
                loss_sum, batches = retain_epoch(model, retain, p, pre_opt, gen, fz.train)
                sched.step()
                losses.append(check_loss(loss_sum, batches, "ascent_schedule fine-tune", epoch))
        opt = make_optimizer(fz.params, p)  # a fresh optimizer for the loop, as in 000; no scheduler
        unfreeze_epoch = None if p.unfreeze_at is None else int(p.unfreeze_at * p.epochs)
        selecting = p.select == "val_acc" and ctx.val is not None and len(ctx.val) > 0
        best_state, best_acc = None, -1.0
        for epoch in range(p.epochs):
            if epoch == unfreeze_epoch:
                stats["unfrozen"] = fz.unfreeze(p.unfreeze, opt)
            scale = reverse_scale(p, epoch)
            sums = Sums(device)
            if p.pattern == "batch":
                interleaved_pass(model, forget, retain, p, scale, opt, gen, fz, sums)
            else:
                if p.pattern == "epoch":
                    sums.add_retain(*retain_epoch(model, retain, p, opt, gen, fz.train))
                forget_pass(model, forget, p, scale, opt, gen, fz, sums)
            if p.intermediate_every and (epoch + 1) % p.intermediate_every == 0:
                sums.add_retain(*retain_epoch(model, retain, p, opt, gen, fz.train))
            losses.append(check_loss(sums.objective, sums.steps, "ascent_schedule", epoch))
            stats["forget_ce"].append(check_loss(sums.forget_ce, sums.forget_steps, "ascent_schedule (forget CE)",
                                                 epoch))
            stats["scale"].append(scale)
            if selecting:
                acc = accuracy(model, ctx.val)  # eval mode; the next phase sets train mode again
                stats["val_acc"].append(acc)
                if acc > best_acc:
                    best_state, best_acc = copy.deepcopy(model.state_dict()), acc
                    stats["selected_epoch"] = epoch
        if best_state is not None:
            model.load_state_dict(best_state)
        for epoch in range(p.final_epochs):
            loss_sum, batches = retain_epoch(model, retain, p, opt, gen, fz.train)
            losses.append(check_loss(loss_sum, batches, "ascent_schedule final fine-tune", epoch))
    return model


_NB = "seed 000"
register_preset("finetune_then_ascent", "ascent_schedule", f"{_NB} Alg. 3",
                "Selective fine-tune (last 2 blocks, cosine, 60 epochs), then one ascent pass over D_f.",
                pre_epochs=60, epochs=1, pattern="forget", scale=1.0, last_k=2)
register_preset("alternating_epoch_ascent", "ascent_schedule", f"{_NB} Alg. 4",
                "Selective fine-tune for 50 epochs, then 50 x (a retain epoch, an ascent epoch on D_f at 0.3).",
                pre_epochs=50, epochs=50, pattern="epoch", scale=0.3, last_k=2)
register_preset("interleaved_ascent", "ascent_schedule", f"{_NB} Alg. 5",
                "100 epochs of min(|retain batches|, |forget batches|) pairs: a retain step, an ascent step at 0.4.",
                epochs=100, pattern="batch", scale=0.4)
register_preset("interleaved_ascent_finetune", "ascent_schedule", f"{_NB} Alg. 6",
                "Interleaved ascent at 0.5 for 100 epochs, then 100 retain epochs with the same optimizer.",
                epochs=100, pattern="batch", scale=0.5, final_epochs=100)
register_preset("hybrid_linear_ascent", "ascent_schedule", f"{_NB} Hybrid Model 1",
                "Interleaved ascent with a linearly growing scale 0.6*e/50 over 50 epochs.",
                epochs=50, pattern="batch", scale=0.6, schedule="linear")
register_preset("hybrid_quadratic_ascent_finetune", "ascent_schedule", f"{_NB} Hybrid Model 2",
                "Interleaved ascent with scale 0.8*(e/50)^2 over 50 epochs, then 10 retain epochs.",
                epochs=50, pattern="batch", scale=0.8, schedule="quadratic", final_epochs=10)
register_preset("hybrid_refined_ascent", "ascent_schedule", f"{_NB} Hybrid Models 3 and 4",
                "Every retain step then 2 ascent steps at 1.0*(e/50)^2, a retain pass every 10 epochs, the best "
                "epoch on validation, then 10 retain epochs.",
                epochs=50, pattern="batch", scale=1.0, schedule="quadratic", forget_steps=2, steps="retain",
                intermediate_every=10, select="val_acc", final_epochs=10)
