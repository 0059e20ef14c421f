"""Fisher forgetting (Golatkar et al. 2020; seed 003 §2.1): Gaussian noise scaled by the inverse Fisher of D_r.

The Fisher is the reference's (meghdadk/SCRUB): per example, sum over classes y of p(y|x) * (d CE(x, y) /
d theta)^2, averaged over D_r, eval mode. Per-example gradients are vectorised with torch.func (vmap over
the batch, one pass per class), so there is no loop over examples. A Preparation, so the caller caches it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap

from rumflow.data import Split
from rumflow.methods.registry import Hyperparameters, Preparation, UnlearnContext, register
from rumflow.methods.ssd import check_importances, prefixed, split_prepared, trainable
from rumflow.training import batch_bounds


class FisherForgettingParams(Hyperparameters):
    alpha: float = Field(1e-6, gt=0, le=1, description="noise scale: var = alpha * clamp(1 / (F + 1e-8), max=cap) "
                         "(the reference uses 1e-7 .. 3e-6)")
    var_cap: float = Field(1e3, gt=0, description="clamp of 1 / (F + 1e-8) before alpha (the reference's 1e3)")
    head_var_cap: float = Field(1e2, gt=0, description="the same clamp for the head (last Linear; the reference's 1e2)")
    head_bn_scale: float = Field(10.0, gt=0, description="variance multiplier for the head and BatchNorm "
                                 "parameters (the reference's 10)")
    batch_size: int = Field(64, ge=1, description="examples per vectorised per-example-gradient pass (memory only)")


def fisher_diagonal(model: nn.Module, split: Split, batch_size: int) -> dict[str, torch.Tensor]:
    """E_x sum_y p(y|x) (d CE(x, y) / d theta)^2 over `split`, eval mode (the true-Fisher diagonal).

    Weights, buffers, .grad and the mode are left as they were. An empty split gives zeros."""
    named = trainable(model)
    acc = {n: torch.zeros_like(q) for n, q in named}
    if len(split) == 0:
        return acc
    was_training = model.training
    model.eval()
    params = {n: q.detach() for n, q in named}
    buffers = dict(model.named_buffers())

    def example_loss(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**ps, **buffers}, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    bounds = batch_bounds(len(split), batch_size)
    try:
        for a, b in zip(bounds[:-1], bounds[1:]):
            xb = split.x[a:b]
            with torch.no_grad():
                prob = F.softmax(model(xb), dim=1)
            for c in range(prob.shape[1]):  # a loop over classes, not examples
                target = torch.full((len(xb),), c, dtype=torch.long, device=xb.device)
                grads = per_example(params, xb, target)
                for n, g in grads.items():
                    acc[n] += torch.einsum("b,b...->...", prob[:, c], g.square())
    finally:
        model.train(was_training)
    return {n: a / len(split) for n, a in acc.items()}


def head_and_norm_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the head's parameters (the last nn.Linear) and of the BatchNorm parameters."""
    head: set[str] = set()
    norm: set[str] = set()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        prefix, module = linears[-1]
        head = {f"{prefix}.{k}" if prefix else k for k, _ in module.named_parameters()}
    for prefix, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            norm |= {f"{prefix}.{k}" if prefix else k for k, _ in m.named_parameters()}
    return head, norm


def noise_variance(fisher: torch.Tensor, alpha: float, cap: float, scale: float) -> torch.Tensor:
    """alpha * clamp(1 / (F + 1e-8), max=cap), averaged over dim 1 for tensors of 2+ dims (the reference's
    per-output-unit variance), times `scale`."""
    var = alpha * (1.0 / (fisher + 1e-8)).clamp(max=cap)
    if var.ndim > 1:
        var = var.mean(dim=1, keepdim=True).expand_as(fisher)
    return var * scale


def _prepare_fisher(model: nn.Module, forget: Split, retain: Split, p: FisherForgettingParams,
                    ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """The Fisher diagonal over D_r."""
    return prefixed("fisher.", check_importances(fisher_diagonal(model, retain, p.batch_size), "fisher_forgetting"))


@register("fisher_forgetting", FisherForgettingParams, source="seed 003 §2.1; Golatkar et al. 2020 (SCRUB repo)",
          prepare=Preparation(_prepare_fisher, params=("batch_size",), uses_retain=True))
def fisher_forgetting(model: nn.Module, forget: Split, retain: Split, p: FisherForgettingParams,
                      ctx: UnlearnContext) -> nn.Module:
    """theta <- theta + sqrt(var) * N(0, 1), var from the inverse Fisher of D_r (weights D_r needs little move most)."""
    (fisher,) = split_prepared(ctx.prepared, model, ("fisher.",), "Fisher")
    head, norm = head_and_norm_names(model)
    gen = ctx.generator()
    with torch.no_grad():
        for name, q in trainable(model):
            cap = p.head_var_cap if name in head else p.var_cap
            scale = p.head_bn_scale if name in head or name in norm else 1.0
            var = noise_variance(fisher[name], p.alpha, cap, scale)
            noise = torch.randn(q.shape, generator=gen).to(q.device)  # drawn on the CPU: same seed, same noise
            q.add_(var.sqrt() * noise)
    return model
