"""Selective Synaptic Dampening (Foster et al., AAAI'24; seed 003 §4.4) and 003's naive Fisher pruning.

Both rest on SSD's diagonal-Fisher importances (`importances`), computed in a Preparation so the caller
can cache them: the mean over mini-batches of the squared gradient of the batch-mean cross-entropy, with
the model in eval mode (the reference implementation's definition, not the per-example Fisher).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.errors import DivergenceError
from rumflow.methods.registry import Hyperparameters, Preparation, UnlearnContext, register, register_preset
from rumflow.training import batch_bounds

# A fixed order for the importance batches: the batch-mean gradient depends on which examples share a
# batch, so a data set stored in class order must not give one-class batches, and the importances must
# not depend on the method's seed (they can then be shared across seeds).
_ORDER_SEED = 0


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The (name, parameter) pairs that unlearning may change."""
    return [(n, q) for n, q in model.named_parameters() if q.requires_grad]


def importances(model: nn.Module, split: Split, batch_size: int) -> dict[str, torch.Tensor]:
    """SSD's diagonal Fisher: (1/#batches) * sum over batches of (d CE_batch-mean / d theta)^2, eval mode.

    Batches of `batch_size` in a fixed shuffled order; the scale depends on the batch size (the square of
    a mean gradient, not a mean of per-example squares). Weights, buffers, .grad and the mode are left as
    they were. An empty split gives zeros."""
    named = trainable(model)
    acc = [torch.zeros_like(q) for _, q in named]
    if len(split) == 0:
        return {n: a for (n, _), a in zip(named, acc)}
    was_training = model.training
    model.eval()
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(_ORDER_SEED)).to(split.x.device)
    bounds = batch_bounds(len(split), batch_size)
    try:
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = order[a:b]
            with torch.enable_grad():
                loss = F.cross_entropy(model(split.x[idx]), split.y[idx])
                grads = torch.autograd.grad(loss, [q for _, q in named], allow_unused=True)
            for total, g in zip(acc, grads):
                if g is not None:
                    total.addcmul_(g, g)
    finally:
        model.train(was_training)
    batches = len(bounds) - 1
    return {n: a / batches for (n, _), a in zip(named, acc)}


def union(first: Split, second: Split) -> Split:
    """The examples of both splits (SSD's full training set D = D_r + D_f)."""
    return Split(torch.cat([first.x, second.x]), torch.cat([first.y, second.y]),
                 torch.cat([first.example_id, second.example_id]))


def check_importances(imp: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Raise DivergenceError when an importance is non-finite (a non-finite input or loss; one sync)."""
    if imp and not bool(torch.stack([torch.isfinite(t).all() for t in imp.values()]).all()):
        raise DivergenceError(f"{what}: the importances are non-finite (a non-finite input or loss); check the "
                              "data and the model; no model was saved.")
    return imp


def split_prepared(prepared: dict[str, torch.Tensor] | None, model: nn.Module, prefixes: tuple[str, ...],
                   what: str) -> list[dict[str, torch.Tensor]]:
    """The prepared importances under each prefix, checked against the model's trainable parameters."""
    names = dict(trainable(model))
    out = []
    for prefix in prefixes:
        part = {k[len(prefix):]: v for k, v in (prepared or {}).items() if k.startswith(prefix)}
        if set(part) != set(names) or any(tuple(part[n].shape) != tuple(q.shape) for n, q in names.items()):
            raise ValueError(f"the prepared {what} importances do not match this model's parameters; compute "
                             f"them with the method's preparation on the model being unlearned.")
        out.append({n: part[n].to(q.device) for n, q in names.items()})
    return out


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every key prefixed (several named groups in one prepared dict)."""
    return {prefix + k: v for k, v in tensors.items()}


# ------------------------------------------------------------------ SSD


class SsdParams(Hyperparameters):
    selection_weighting: float = Field(10.0, gt=0, description="alpha: a weight is selected where "
                                       "I_f > alpha * I_ref (the reference's selection_weighting)")
    dampening_constant: float = Field(1.0, gt=0, description="lambda: a selected weight is multiplied by "
                                      "min((lambda * I_ref / I_f)^exponent, lower_bound); the original's 1, "
                                      "seed 003 used 0.1 (preset ssd_retain)")
    exponent: float = Field(1.0, gt=0, description="exponent of the dampening factor (the reference's 1)")
    lower_bound: float = Field(1.0, gt=0, description="cap on the dampening factor (the reference calls it "
                               "lower_bound; 1 = never scale a weight up)")
    reference: Literal["full", "retain"] = Field(
        "full", description="importance the forget importance is compared with: full = I over D_r + D_f "
        "(original SSD), retain = I over D_r (seed 003 eq. 10)")
    batch_size: int = Field(128, ge=2, description="mini-batch size of both importances (their scale depends "
                            "on it; the reference uses 128 for both)")


def _prepare_ssd(model: nn.Module, forget: Split, retain: Split, p: SsdParams,
                 ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """I_f over D_f and I_ref over D_r + D_f (full) or D_r (retain), eval mode."""
    ref = union(retain, forget) if p.reference == "full" else retain
    out = prefixed("forget.", check_importances(importances(model, forget, p.batch_size), "ssd"))
    out.update(prefixed("reference.", check_importances(importances(model, ref, p.batch_size), "ssd")))
    return out


@torch.no_grad()
def dampen(model: nn.Module, forget_imp: dict[str, torch.Tensor], ref_imp: dict[str, torch.Tensor],
           alpha: float, lam: float, exponent: float = 1.0, cap: float = 1.0) -> torch.Tensor:
    """SSD's one-shot update, in place: where I_f > alpha * I_ref, theta <- theta * min((lam * I_ref / I_f)^exponent,
    cap). Returns the number of selected weights (a device tensor, no sync).

    The factor does not depend on theta: eq. (9) of seed 003 writes min(lambda * I_D / I_Df * theta, 1), a typo
    (its Algorithm 2 and the reference code multiply theta by the min). Selection implies I_f > 0, so the
    division is safe wherever it is used; I_ref = 0 there gives factor 0 (the weight is zeroed)."""
    counts = []
    for name, q in trainable(model):
        f, r = forget_imp[name], ref_imp[name]
        sel = f > alpha * r
        factor = (lam * r / f).pow(exponent).clamp(max=cap)
        q.copy_(torch.where(sel, q * factor, q))
        counts.append(sel.sum())
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long)


@register("ssd", SsdParams, source="seed 003 §4.4 eqs. 8-10, Alg. 2; Foster et al. AAAI'24",
          prepare=Preparation(_prepare_ssd, params=("reference", "batch_size"), uses_retain=True))
def ssd(model: nn.Module, forget: Split, retain: Split, p: SsdParams, ctx: UnlearnContext) -> nn.Module:
    """Selective Synaptic Dampening: shrink the weights far more important to D_f than to the reference set.

    One pass, no training; every trainable parameter (BatchNorm affine and biases included) is dampened."""
    forget_imp, ref_imp = split_prepared(ctx.prepared, model, ("forget.", "reference."), "SSD")
    selected = dampen(model, forget_imp, ref_imp, p.selection_weighting, p.dampening_constant, p.exponent,
                      p.lower_bound)
    total = sum(q.numel() for _, q in trainable(model))
    ctx.stats["selected_fraction"] = float(selected) / max(total, 1)
    return model


register_preset("ssd_retain", "ssd", source="seed 003 §4.4 eq. 10, Table 1", reference="retain",
                dampening_constant=0.1,
                summary="SSD as seed 003 ran it: reference importance over D_r (eq. 10) and lambda 0.1 "
                        "(a selected weight is multiplied by less than lambda / alpha = 0.01: its collapse)")


# ------------------------------------------------------------------ naive Fisher pruning


class FisherPruneParams(Hyperparameters):
    batch_size: int = Field(128, ge=2, description="mini-batch size of the forget importance (SSD's definition)")


def _prepare_forget_importance(model: nn.Module, forget: Split, retain: Split, p: FisherPruneParams,
                               ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """I_f over D_f (eval mode)."""
    return prefixed("forget.", check_importances(importances(model, forget, p.batch_size), "fisher_prune_naive"))


@register("fisher_prune_naive", FisherPruneParams, source="seed 003 §4.4 eq. 7 (a strawman, not run)",
          prepare=Preparation(_prepare_forget_importance, params=("batch_size",)))
def fisher_prune_naive(model: nn.Module, forget: Split, retain: Split, p: FisherPruneParams,
                       ctx: UnlearnContext) -> nn.Module:
    """Zero every weight with a positive forget importance (003 eq. 7; degenerate: almost all are > 0)."""
    (forget_imp,) = split_prepared(ctx.prepared, model, ("forget.",), "forget")
    counts = []
    with torch.no_grad():
        for name, q in trainable(model):
            hit = forget_imp[name] > 0
            q.masked_fill_(hit, 0.0)
            counts.append(hit.sum())
    pruned = float(torch.stack(counts).sum()) if counts else 0.0
    ctx.stats["pruned_fraction"] = pruned / max(sum(q.numel() for _, q in trainable(model)), 1)
    return model
