"""Activation ("forget") pruning (seed 004 §3.3): zero, for good, the activation units the forget set drives
hardest (above a per-layer quantile of its batch-mean activation), fine-tuning on D_r in between.

Every call of an nn.ReLU is its own site with its own mask (004 shared one mask between the two calls of a
torchvision BasicBlock's `relu`). Masks are buffers `<relu path>.activation_mask_<call>` attached by
`rumflow.models.attach_activation_masks`, so the returned model, its checkpoint and `model_from_state` all
apply them."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.parts import OptimizerName, build_optimizer
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register, retain_count
from rumflow.models import ACTIVATION_MASK, attach_activation_masks, is_activation_mask
from rumflow.training import batches_per_epoch, check_loss, minibatches

Site = tuple[str, int, torch.Size]  # (module path, call index, one example's activation shape)


class ActivationPruningParams(MethodParams):
    lr: float = Field(1e-3, gt=0, description="learning rate at the start of the cosine schedule (per retain step)")
    epochs: int = Field(4, ge=0, description="total epochs over D_r; epochs 0, 2, 4, ... (the first prune_epochs "
                        "of them) are prune epochs that interleave the forget mask steps")
    prune_epochs: int = Field(2, ge=0, description="at most this many prune epochs, among epochs 0, 2, 4, ... "
                              "(004: 2 of 4)")
    q_first: float = Field(0.99, gt=0, le=1, description="quantile q of the first activation site (prune above it)")
    q_last: float = Field(0.9, gt=0, le=1, description="quantile q of the last site; sites in between are "
                          "interpolated linearly in forward order (004: 0.99 stem ... 0.9 layer4)")
    quantile_over: Literal["channel", "all"] = Field(
        "channel", description="channel: the quantile across channels at each position (004's code); all: over "
        "the whole C x H x W batch-mean activation (the paper's reading)")
    mask_accumulate: Literal["product", "replace"] = Field(
        "product", description="product: a unit pruned by any forget batch stays pruned (004); replace: the "
        "last forget batch's mask only")
    optimizer: OptimizerName = Field("adamw", description="optimizer of the retain steps (004: AdamW)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer sgd only)")


def prune_mask(activation: torch.Tensor, q: float, over: str = "channel") -> torch.Tensor:
    """Kept units (True) of one site: the batch-mean activation m <= its q-quantile, taken across channels
    at each position ('channel') or over the whole example shape ('all')."""
    m = activation.detach().float().mean(0)
    if over == "channel":
        thr = torch.quantile(m, q, dim=0, keepdim=True)
    else:
        thr = torch.quantile(m.flatten(), q)
    return m <= thr


def site_quantiles(n: int, q_first: float, q_last: float) -> list[float]:
    """q per site, linear from q_first (first site) to q_last (last site)."""
    return [q_first if n == 1 else q_first + (q_last - q_first) * i / (n - 1) for i in range(n)]


def mask_step_positions(n_forget: int, n_retain: int) -> list[int]:
    """Before which retain step each of the n_forget mask steps runs: spread evenly over the epoch
    (004's `if n % F_freq and j < F` spent them all in the first few steps)."""
    return [(j * n_retain) // n_forget for j in range(n_forget)]


@torch.no_grad()
def activation_sites(model: nn.Module, x: torch.Tensor) -> list[Site]:
    """Every call of an nn.ReLU in one eval-mode forward pass of x[:1], in call order."""
    calls: dict[str, int] = {}
    sites: list[Site] = []
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            def record(mod: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> None:
                sites.append((path, calls.get(path, 0), out.shape[1:]))
                calls[path] = calls.get(path, 0) + 1
            handles.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        model(x[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sites


def _mask_key(path: str, call: int) -> str:
    return f"{path}.{ACTIVATION_MASK}{call}"


def _attach(model: nn.Module, sites: list[Site], device: torch.device) -> None:
    """All-kept masks for every site that has none yet (a parent's masks are kept and pruned further)."""
    existing = dict(model.named_buffers())
    masks = {_mask_key(path, call): existing.get(_mask_key(path, call),
                                                 torch.ones(shape, dtype=torch.bool, device=device))
             for path, call, shape in sites}
    attach_activation_masks(model, masks)


@contextmanager
def _collecting(model: nn.Module, sites: list[Site], p: ActivationPruningParams) -> Iterator[None]:
    """While active, each forward pass updates every site's mask from its raw activation before it is applied."""
    qs = dict(zip(((path, call) for path, call, _ in sites), site_quantiles(len(sites), p.q_first, p.q_last)))
    handles = []
    for path in dict.fromkeys(path for path, _, _ in sites):
        def update(mod: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> None:
            call = mod._mask_calls % mod._mask_sites
            mask = getattr(mod, f"{ACTIVATION_MASK}{call}")
            new = prune_mask(out, qs[(path, call)], p.quantile_over)
            if p.mask_accumulate == "product":
                mask.logical_and_(new)
            else:
                mask.copy_(new)
        # prepend: runs before the hook that applies the mask, so it sees the raw activation
        handles.append(model.get_submodule(path).register_forward_hook(update, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@register("activation_pruning", ActivationPruningParams, source="seed 004 §3.3; unl_algorithms/pruning")
def activation_pruning(model: nn.Module, forget: Split, retain: Split, p: ActivationPruningParams,
                       ctx: UnlearnContext) -> nn.Module:
    """Prune activations above the q-quantile of the forget batches' mean activation, fine-tuning on D_r."""
    gen = ctx.generator()
    device = retain.x.device
    opt = build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay)  # over the returned model
    total = max(p.epochs * batches_per_epoch(retain_count(len(retain), p), p.batch_size), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    sites: list[Site] | None = None
    losses = ctx.stats["loss"]
    mask_steps = 0
    for epoch in range(p.epochs):
        prune = epoch % 2 == 0 and epoch // 2 < p.prune_epochs
        retain_batches = list(epoch_batches(len(retain), p, gen, device))
        due: list[torch.Tensor] = []
        positions: list[int] = []
        if prune:
            if sites is None:  # sites only once pruning starts: zero prune epochs leave the model as it was
                sites = activation_sites(model, forget.x)
                _attach(model, sites, device)
            due = list(minibatches(len(forget), p.batch_size, gen, device))
            positions = mask_step_positions(len(due), len(retain_batches))
        loss_sum, batches, j = torch.zeros((), device=device), 0, 0
        for n, idx in enumerate(retain_batches + [None]):
            while j < len(due) and (positions[j] <= n):
                model.eval()  # masks from eval-mode activations; BatchNorm statistics untouched
                with torch.no_grad(), _collecting(model, sites, p):
                    model(forget.x[due[j]])
                j += 1
                mask_steps += 1
            if idx is None:
                break
            model.train()
            loss = F.cross_entropy(model(retain.x[idx]), retain.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "activation_pruning", epoch))
    ctx.stats["mask_steps"] = mask_steps
    if sites:
        masks = [b for k, b in model.named_buffers() if is_activation_mask(k)]
        ctx.stats["pruned_fraction"] = float(1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))
    return model
