"""evaluate_model and forgetting_quality_of on a tiny digits model: every column is there and sane."""
from __future__ import annotations

import math

import pytest
import torch

from rumflow.config import EvaluateConfig, ForgettingQualityConfig
from rumflow.data import load_dataset
from rumflow.evaluation import evaluate_model, forgetting_quality_of
from rumflow.metrics import MIA_FEATURES, mufac_metrics
from rumflow.models import ModelSpec, create_model
from rumflow.planning import StepPlan
from rumflow.training import Recipe, predict, train_model

NEW_COLUMNS = ("mia_lr", "forgetting_score", "nomus", "acc_test_top2", "js_forget_test")


@pytest.fixture(scope="module")
def tiny():
    """Digits, a plan forgetting 30 training examples, and two small CNNs briefly trained (seeds 0, 1)."""
    ds = load_dataset("digits")
    ids = ds.train.ids()
    plan = StepPlan(step=1, low=ids[0:30:3].tolist(), mid=ids[1:30:3].tolist(), high=ids[2:30:3].tolist(),
                    before=[])
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    models = []
    for seed in (0, 1):
        model = create_model(spec, seed=seed)
        data = ds.train.drop(plan.forgotten) if seed else ds.train  # model 1 never sees the forget set
        train_model(model, data, Recipe(epochs=2, lr=0.05, batch_size=64), seed=seed)
        models.append(model)
    return ds, plan, models


def test_evaluate_model_has_every_new_column(tiny):
    ds, plan, (model, _) = tiny
    out = evaluate_model(model, ds, plan, EvaluateConfig(), seed=0)
    for c in NEW_COLUMNS + tuple(f"mia_{f}" for f in MIA_FEATURES) + ("acc_test", "acc_forget"):
        assert c in out and isinstance(out[c], float), c
        assert math.isfinite(out[c]), c
    assert 0.0 <= out["mia_lr"] <= 1.0
    assert out["forgetting_score"] == pytest.approx(abs(out["mia_lr"] - 0.5))
    assert out["nomus"] == pytest.approx((out["acc_test"] + 1 - 2 * out["forgetting_score"]) / 2)
    assert out["acc_test"] <= out["acc_test_top2"] <= 1.0
    assert 0.0 <= out["js_forget_test"] <= math.sqrt(math.log(2)) + 1e-9
    # the same numbers as the metric functions on the model's own logits (the forget set is plan.mix)
    f = ds.train.take(plan.mix)
    with torch.no_grad():
        direct = mufac_metrics(predict(model, f.x), f.y, predict(model, ds.test.x), ds.test.y, seed=0)
    assert direct == pytest.approx({c: out[c] for c in NEW_COLUMNS})
    # seeded: evaluating again gives the same row
    assert evaluate_model(model, ds, plan, EvaluateConfig(), seed=0) == out


def test_evaluate_model_without_svc_mia_still_has_the_loss_metrics(tiny):
    ds, plan, (model, _) = tiny
    out = evaluate_model(model, ds, plan, EvaluateConfig(mia=False, loss_mia_max=8), seed=1)
    assert math.isnan(out["mia"]) and all(math.isfinite(out[c]) for c in NEW_COLUMNS)


def test_forgetting_quality_of_reports_both_scores(tiny):
    ds, plan, (a, b) = tiny
    out = forgetting_quality_of([a, b], [b, a], ds, plan, ForgettingQualityConfig(models=2, scalar="ce_true_label"))
    assert set(out) == {"forgetting_quality", "score", "f_score_004", "score_004", "acc_retain_u", "acc_retain_r",
                        "acc_test_u", "acc_test_r"}
    # the same two models on both sides: every attack sees identical samples, so no attack reaches eps > 0
    # and the public list's initial 0 gives h = 1 on every example
    assert out["forgetting_quality"] == 1.0 and out["score"] == pytest.approx(1.0)
    # 004's variant maps eps = 0 to 2 / 2**7, not 1: only examples whose attacks are all discarded get 1
    assert 0 < out["f_score_004"] <= 1 and out["score_004"] == pytest.approx(out["f_score_004"])
    apart = forgetting_quality_of([a, a], [b, b], ds, plan)
    assert 0 < apart["forgetting_quality"] <= 1 and 0 < apart["f_score_004"] <= 1
