"""Random labelling (forget examples relabelled at random, trained together with D_r) and SalUn
(Fan et al. 2024: the same, restricted to the weights most salient for the forget loss)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from rumflow.data import Split
from rumflow.methods.common import mixed_batches, num_classes
from rumflow.methods.registry import (MethodParams, Preparation, UnlearnContext, register, register_preset,
                                      retain_sample)
from rumflow.training import check_loss, minibatches, sgd


def random_labels(y: torch.Tensor, classes: int, gen: torch.Generator) -> torch.Tensor:
    """For each label, a class drawn uniformly from the other `classes - 1` (never the true one)."""
    shift = torch.randint(1, classes, y.shape, generator=gen).to(y.device)
    return (y + shift) % classes


def epoch_labels(y: torch.Tensor, classes: int, mode: str, exclude_true: bool, gen: torch.Generator) -> torch.Tensor:
    """One epoch's forget labels: redrawn (wrong ones only, or any class), or the true ones to be permuted
    within each mini-batch."""
    if mode == "permute_in_batch":
        return y
    if exclude_true:
        return random_labels(y, classes, gen)
    return torch.randint(0, classes, y.shape, generator=gen).to(y.device)


@torch.no_grad()
def salun_mask(model: nn.Module, forget: Split, threshold: float, batch_size: int) -> dict[str, torch.Tensor]:
    """SalUn's saliency mask: True for the `threshold` fraction of parameters with the largest |d CE / d theta|
    over the forget set (eval mode, gradient of the mean CE over all of D_f, no optimizer step).

    Pure: the model's weights, buffers, .grad fields and train/eval mode are left as they were.
    `batch_size` only bounds memory. An empty forget set gives an all-False mask (nothing is salient)."""
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    grads = [torch.zeros_like(q) for _, q in named]
    if len(forget) > 0:
        was_training = model.training
        model.eval()
        try:
            for idx in minibatches(len(forget), batch_size, torch.Generator(), forget.x.device, shuffle=False):
                with torch.enable_grad():
                    loss = -F.cross_entropy(model(forget.x[idx]), forget.y[idx], reduction="sum") / len(forget)
                    gs = torch.autograd.grad(loss, [q for _, q in named], allow_unused=True)
                for acc, g in zip(grads, gs):
                    if g is not None:
                        acc += g
        finally:
            model.train(was_training)
    flat = torch.cat([g.abs().flatten() for g in grads])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if len(forget) > 0 and flat.numel() > 0:
        k = min(flat.numel(), max(1, round(threshold * flat.numel())))
        keep[torch.topk(flat, k, sorted=False).indices] = True
    masks, offset = {}, 0
    for (name, q) in named:
        masks[name] = keep[offset:offset + q.numel()].view_as(q)
        offset += q.numel()
    return masks


class RandomLabelParams(MethodParams):
    lr: float = Field(0.1, gt=0, description="learning rate (constant)")
    epochs: int = Field(10, ge=0, description="passes over D_f (relabelled each epoch) together with D_r")
    label_mode: Literal["redraw", "permute_in_batch"] = Field(
        "redraw", description="redraw: a class drawn per forget example each epoch (SPEC); permute_in_batch: "
        "the forget labels of each mini-batch shuffled among themselves (seed 004's RLFTrainer)")
    exclude_true_label: bool = Field(True, description="redraw only: draw from the C-1 wrong classes (never the "
                                     "true label); False draws from all C classes")
    mix_retain: bool = Field(True, description="batches mix D_f with D_r (SPEC); False trains on D_f alone "
                             "(seed 004's forget phase)")

    @model_validator(mode="after")
    def _permute_keeps_labels(self) -> "RandomLabelParams":
        """A permutation can hand an example its own label: refuse the contradictory combination."""
        if self.label_mode == "permute_in_batch" and self.exclude_true_label:
            raise ValueError("label_mode permute_in_batch cannot exclude the true label; set "
                             "exclude_true_label: false")
        return self


class SalunParams(MethodParams):
    threshold: float = Field(0.5, gt=0, le=1, description="fraction of the weights (globally, the most salient "
                             "for the forget loss) that unlearning may change; the rest stay bit-identical")
    lr: float = Field(0.013, gt=0, description="learning rate (constant)")
    epochs: int = Field(10, ge=0, description="passes over D_f (relabelled each epoch) together with D_r")


def _relabel_unlearn(model: nn.Module, forget: Split, retain: Split, p: MethodParams, ctx: UnlearnContext,
                     mask: dict[str, torch.Tensor] | None, what: str) -> nn.Module:
    """CE on D_f with labels redrawn each epoch mixed with D_r; with `mask`, only masked-in weights move."""
    gen = ctx.generator()
    device = retain.x.device
    classes = num_classes(model, forget.x)
    # SalUn's params have none of these options: SPEC's behaviour
    mode = getattr(p, "label_mode", "redraw")
    exclude = getattr(p, "exclude_true_label", True)
    mix = getattr(p, "mix_retain", True)
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    # (parameter, mask, frozen copy of its starting value) for every parameter the mask restricts
    restricted = []
    if mask is not None:
        for name, q in model.named_parameters():
            if q.requires_grad:
                m = mask[name].to(device=q.device, dtype=torch.bool)
                restricted.append((q, m, ~m, q.detach().clone()))
    losses = ctx.stats["loss"]
    for epoch in range(p.epochs):
        model.train()
        fake = epoch_labels(forget.y, classes, mode, exclude, gen)
        if mix:
            sample = retain_sample(len(retain), p, gen)
            pool = torch.arange(len(retain), device=device) if sample is None else sample.to(device)
            pairs = mixed_batches(len(forget), len(pool), p.batch_size, gen, device)
        else:
            pool = torch.zeros(0, dtype=torch.long, device=device)
            pairs = ((idx, pool) for idx in minibatches(len(forget), p.batch_size, gen, device))
        loss_sum, batches = torch.zeros((), device=device), 0
        for fidx, ridx in pairs:
            ridx = pool[ridx]
            yf = fake[fidx]
            if mode == "permute_in_batch":  # the batch's own forget labels, shuffled among its forget examples
                yf = yf[torch.randperm(len(fidx), generator=gen).to(device)]
            xb = torch.cat([forget.x[fidx], retain.x[ridx]])
            yb = torch.cat([yf, retain.y[ridx]])
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for q, _, off, _ in restricted:
                if q.grad is not None:
                    q.grad.masked_fill_(off, 0)
            opt.step()
            with torch.no_grad():  # weight decay and momentum would still move masked-out weights: undo
                for q, m, off, q0 in restricted:
                    q.copy_(torch.where(m, q, q0))
                    buf = opt.state[q].get("momentum_buffer")
                    if buf is not None:
                        buf.masked_fill_(off, 0)
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, what, epoch))
    return model


@register("random_label", RandomLabelParams, source="SPEC; RUM/SalUn code")
def random_label(model: nn.Module, forget: Split, retain: Split, p: RandomLabelParams,
                 ctx: UnlearnContext) -> nn.Module:
    """CE on D_f with random wrong labels (redrawn each epoch, over all other classes) mixed with D_r."""
    return _relabel_unlearn(model, forget, retain, p, ctx, None, "random_label")


register_preset("amnesiac", "random_label", "seed 003 §2.2; Graves et al. 2021",
                "Amnesiac unlearning: forget examples relabelled with random wrong classes, trained with D_r",
                exclude_true_label=True, epochs=3)
register_preset("random_label_permute", "random_label", "seed 004 RLFTrainer (reproduction only)",
                "Seed 004's random labels: forget labels permuted within each batch (a sample may keep its own)",
                label_mode="permute_in_batch", exclude_true_label=False, epochs=20)


def _prepare_salun(model: nn.Module, forget: Split, retain: Split, p: SalunParams,
                   ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """The saliency mask of the model being unlearned (SalUn's preparation)."""
    return salun_mask(model, forget, p.threshold, p.batch_size)


@register("salun", SalunParams, source="SPEC; Fan et al. 2024",
          prepare=Preparation(_prepare_salun, params=("threshold", "batch_size")))
def salun(model: nn.Module, forget: Split, retain: Split, p: SalunParams, ctx: UnlearnContext) -> nn.Module:
    """Random labelling restricted to the top-`threshold` weights by forget-loss saliency (SalUn).

    The mask is the method's preparation (salun_mask() on this model), in ctx.prepared."""
    mask = ctx.prepared
    names = {n: q for n, q in model.named_parameters() if q.requires_grad}
    if mask is None or set(mask) != set(names) or any(tuple(mask[n].shape) != tuple(q.shape)
                                                      for n, q in names.items()):
        raise ValueError("the prepared SalUn mask does not match this model's parameters; compute it with "
                         "salun_mask() on the model being unlearned.")
    ctx.stats["mask_fraction"] = float(sum(int(m.sum()) for m in mask.values()) / max(
        sum(m.numel() for m in mask.values()), 1))
    return _relabel_unlearn(model, forget, retain, p, ctx, mask, "salun")
