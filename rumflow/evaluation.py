"""Evaluate one model against one step's plan: accuracies on every set, the MIA features and seed 001's
loss metrics; and the NeurIPS 2023 forgetting quality of N unlearned against N retrained models."""
from __future__ import annotations

import torch
from torch import nn

from rumflow.config import EvaluateConfig, ForgettingQualityConfig
from rumflow.data import Dataset, Split
from rumflow.planning import TIERS, StepPlan
from rumflow.training import predict


def _mean(mask_correct: torch.Tensor) -> float:
    return float(mask_correct.float().mean()) if mask_correct.numel() else float("nan")


@torch.no_grad()
def evaluate_model(model: nn.Module, ds: Dataset, plan: StepPlan, cfg: EvaluateConfig, seed: int) -> dict[str, float]:
    """Accuracies (retain, this step's forget set, all forget sets so far, val, test, each tier), the SVC
    MIA and seed 001's metrics (loss MIA, forgetting score, NoMUS, top-2 test accuracy, loss JS distance
    between this step's forget set and the test set). Columns: docs/metrics.md."""
    from rumflow.metrics import MIA_FEATURES, mufac_metrics, svc_mia

    train = ds.train
    logits = predict(model, train.x)
    correct = logits.argmax(1) == train.y
    forgotten = torch.as_tensor(plan.forgotten, dtype=torch.long, device=train.x.device)
    retain = ~torch.isin(train.example_id, forgotten)
    forget_pos = train.positions(plan.mix)
    test_logits = predict(model, ds.test.x)
    out = {
        "acc_retain": _mean(correct[retain]),
        "acc_forget": _mean(correct[forget_pos]),
        "acc_forget_all": _mean(correct[train.positions(plan.forgotten)]),
        "acc_val": _mean(predict(model, ds.val.x).argmax(1) == ds.val.y),
        "acc_test": _mean(test_logits.argmax(1) == ds.test.y),
    }
    for tier in TIERS:
        out[f"acc_{tier}"] = _mean(correct[train.positions(plan.tier(tier))])
    out.update({f"mia_{f}": float("nan") for f in MIA_FEATURES} | {"mia": float("nan")})
    if cfg.mia:
        out.update(svc_mia(logits[retain], train.y[retain], test_logits, ds.test.y,
                           logits[forget_pos], train.y[forget_pos], max_shadow=cfg.mia_max_shadow, seed=seed))
    # one host copy of the two logit blocks; the metrics are numpy/sklearn on at most 2 x loss_mia_max rows
    out.update(mufac_metrics(logits[forget_pos].cpu(), train.y[forget_pos].cpu(), test_logits.cpu(),
                             ds.test.y.cpu(), max_examples=cfg.loss_mia_max, seed=seed))
    return out


@torch.no_grad()
def forgetting_quality_of(unlearned: list[nn.Module], retrained: list[nn.Module], ds: Dataset,
                          plan: StepPlan, cfg: ForgettingQualityConfig | None = None) -> dict[str, float]:
    """NeurIPS 2023 forgetting quality F on this step's forget set with `cfg`'s scalar, attacks, delta
    and bins (defaults: the public scoring code's), the final score F * (RA_u / RA_r) * (TA_u / TA_r)
    with accuracies averaged over the models, and 004's F-score variant and its total (reproduction)."""
    from rumflow.metrics import challenge_score, f_score_004, forgetting_quality

    cfg = cfg or ForgettingQualityConfig()
    forget = ds.train.take(plan.mix)
    retain = ds.train.drop(plan.forgotten)

    def outputs(models: list[nn.Module]) -> torch.Tensor:
        return torch.stack([predict(m, forget.x) for m in models]).cpu()

    def acc(models: list[nn.Module], split: Split) -> float:
        return float(sum((predict(m, split.x).argmax(1) == split.y).float().mean() for m in models) / len(models))

    out_u, out_r = outputs(unlearned), outputs(retrained)
    f = forgetting_quality(out_u, out_r, forget.y.cpu(), delta=cfg.delta, bin_width=cfg.bin_width,
                           n_bins=cfg.n_bins, scalar=cfg.scalar, attacks=cfg.attacks)
    ra_u, ra_r = acc(unlearned, retain), acc(retrained, retain)
    ta_u, ta_r = acc(unlearned, ds.test), acc(retrained, ds.test)
    f004 = f_score_004(out_u, out_r)
    utility_004 = (ra_u * ta_u) / (ra_r * ta_r) if ra_r * ta_r > 0 else float("nan")
    return {"forgetting_quality": f, "score": challenge_score(f, ra_u, ra_r, ta_u, ta_r),
            "f_score_004": f004, "score_004": f004 * utility_004,
            "acc_retain_u": ra_u, "acc_retain_r": ra_r, "acc_test_u": ta_u, "acc_test_r": ta_r}
