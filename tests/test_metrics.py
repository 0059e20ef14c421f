"""Metrics of SPEC section 7 on hand-computed and constructed cases."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from rumflow.metrics import (add_derived_columns, attack_epsilons, challenge_score, epsilon_scores,
                             example_epsilons, forgetting_quality, mia_features, modified_entropy, svc_mia,
                             tow, tow_mia)

# ------------------------------------------------------------------------------------------------ ToW

def test_tow_hand_computed():
    # (1 - .1) * (1 - .05) * (1 - .05)
    assert tow(0.9, 0.95, 0.85, 0.8, 1.0, 0.9) == pytest.approx(0.9 * 0.95 * 0.95)
    # (1 - .2) * (1 - .05) * (1 - .05)
    assert tow_mia(0.3, 0.95, 0.85, 0.5, 1.0, 0.9) == pytest.approx(0.8 * 0.95 * 0.95)
    assert tow(0.37, 0.99, 0.91, 0.37, 0.99, 0.91) == 1.0
    np.testing.assert_allclose(tow([1.0, 0.5], 1, 1, [0.0, 0.5], 1, 1), [0.0, 1.0])


def _row(strategy, step, stage, final, seed=0, proxy="conf", **kw):
    base = dict(run="r", seed=seed, proxy=proxy, strategy=strategy, step=step, stage=stage, tier=stage,
                final=final, acc_forget=1.0, acc_retain=1.0, acc_test=0.9, mia=0.1, seconds=5.0,
                seconds_step=5.0, retrain_seconds=np.nan)
    base.update(kw)
    return base


def test_add_derived_columns_hand_built():
    rows = [
        _row("original", 0, "mix", True),
        _row("rum", 1, "low", False, seconds=1.0, seconds_step=1.0, retrain_seconds=10.0,
             acc_forget=0.8, acc_retain=1.0, acc_test=0.9, mia=0.5),
        _row("rum", 1, "high", True, seconds=2.0, seconds_step=3.0, retrain_seconds=10.0,
             acc_forget=0.9, acc_retain=0.95, acc_test=0.85, mia=0.3),
        _row("retrain", 1, "mix", True, seconds=10.0, seconds_step=10.0, retrain_seconds=10.0,
             acc_forget=0.8, acc_retain=1.0, acc_test=0.9, mia=0.5),
        _row("vanilla", 1, "mix", True, seconds=4.0, seconds_step=4.0, retrain_seconds=np.nan,
             acc_forget=0.8, acc_retain=1.0, acc_test=0.9, mia=0.5),
        # another seed's retrain must not be used for seed 0
        _row("retrain", 1, "mix", True, seed=1, seconds=20.0, retrain_seconds=20.0, acc_forget=0.0),
        _row("vanilla", 1, "mix", True, seed=1, seconds=5.0, retrain_seconds=20.0, acc_forget=0.0),
        # a step whose retrain is missing gets NaN, not an error
        _row("vanilla", 2, "mix", True, seconds=5.0, retrain_seconds=np.nan),
    ]
    df = pd.DataFrame(rows, index=np.arange(10, 10 + len(rows)))
    out = add_derived_columns(df)
    assert list(out.index) == list(df.index) and list(out["strategy"]) == list(df["strategy"])
    assert "tow" not in df.columns  # the input is not modified
    tow_, tmia, rte, rte_step = (out[c].to_numpy() for c in ("tow", "tow_mia", "rte", "rte_step"))
    assert np.isnan(tow_[0]) and np.isnan(tmia[0]) and np.isnan(rte[0])    # original: no reference
    assert tow_[1] == 1.0 and tmia[1] == 1.0
    assert tow_[2] == pytest.approx(0.9 * 0.95 * 0.95) and tmia[2] == pytest.approx(0.8 * 0.95 * 0.95)
    assert rte[2] == pytest.approx(0.2) and rte_step[2] == pytest.approx(0.3)
    assert tow_[3] == 1.0 and tmia[3] == 1.0 and rte[3] == 1.0             # retrain vs itself: exactly 1
    assert rte[4] == pytest.approx(0.4)                                     # retrain_seconds from the reference row
    assert tow_[5] == 1.0 and tow_[6] == 1.0 and rte[6] == pytest.approx(0.25)
    assert np.isnan(tow_[7]) and np.isnan(rte[7])
    # idempotent: recomputing over existing derived columns gives the same numbers
    pd.testing.assert_frame_equal(add_derived_columns(out), out)


def test_add_derived_columns_rejects_two_references():
    df = pd.DataFrame([_row("retrain", 1, "mix", True), _row("retrain", 1, "mix", True)])
    with pytest.raises(ValueError, match="more than one retrain row"):
        add_derived_columns(df)


# ------------------------------------------------------------------------------------------------ MIA

def _buggy_m_entropy(prob, y):
    """RUM/SalUn's variant: `[:, y]` replaces, in every row, every column that is a label in the batch."""
    log_p = -np.log(np.maximum(prob, 1e-30))
    rev = 1 - prob
    log_rev = -np.log(np.maximum(rev, 1e-30))
    mp, mlp = prob.copy(), log_rev.copy()
    mp[:, y] = rev[:, y]
    mlp[:, y] = log_p[:, y]
    return (mp * mlp).sum(axis=1)


def test_m_entropy_hand_computed_and_not_the_buggy_variant():
    p = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    y = np.array([0, 1])
    expected = [
        -(1 - 0.7) * math.log(0.7) - 0.2 * math.log(1 - 0.2) - 0.1 * math.log(1 - 0.1),
        -(1 - 0.6) * math.log(0.6) - 0.3 * math.log(1 - 0.3) - 0.1 * math.log(1 - 0.1),
    ]
    got = mia_features(np.log(p), y)["m_entropy"]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(modified_entropy(p, y), expected, rtol=1e-12)
    assert expected[0] == pytest.approx(0.162167245, abs=1e-8)
    buggy = _buggy_m_entropy(p, y)
    assert np.all(np.abs(buggy - expected) > 0.1)
    # with a single label in the batch the two agree
    np.testing.assert_allclose(_buggy_m_entropy(p[:1], y[:1]), expected[:1], rtol=1e-12)


def test_mia_features_values_and_torch_input():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    f = mia_features(logits, y)
    p = torch.softmax(logits.detach().double(), 1).numpy()
    np.testing.assert_allclose(f["prob"], p)
    np.testing.assert_array_equal(f["correctness"], [1.0, 0.0])
    np.testing.assert_allclose(f["confidence"], p[[0, 1], [0, 0]])
    np.testing.assert_allclose(f["entropy"], -(p * np.log(p)).sum(1))
    # saturated logits stay finite (clamped logs)
    sat = mia_features(np.array([[1000.0, -1000.0, 0.0]]), np.array([1]))
    assert all(np.isfinite(v).all() for v in sat.values())


def _logits(rng, n, margin, noise, classes=10):
    y = rng.integers(0, classes, n)
    z = rng.normal(0.0, noise, (n, classes))
    z[np.arange(n), y] += margin
    return z, y


MEMBER = dict(margin=8.0, noise=1.0)       # confident on what it was trained on
NONMEMBER = dict(margin=3.0, noise=1.5)    # less so on unseen data


def test_svc_mia_forget_like_retain_is_near_zero():
    rng = np.random.default_rng(0)
    retain, test = _logits(rng, 1400, **MEMBER), _logits(rng, 360, **NONMEMBER)
    out = svc_mia(*retain, *test, *_logits(rng, 200, **MEMBER))
    assert set(out) == {"mia_correctness", "mia_confidence", "mia_entropy", "mia_m_entropy", "mia_prob", "mia"}
    assert out["mia"] == out["mia_confidence"]
    for k in ("mia_confidence", "mia_entropy", "mia_m_entropy", "mia_prob"):
        assert out[k] < 0.1, (k, out[k])


def test_svc_mia_forget_like_test_matches_the_non_member_rate():
    rng = np.random.default_rng(1)
    retain, test = _logits(rng, 1400, **MEMBER), _logits(rng, 360, **NONMEMBER)
    forget = _logits(rng, 300, **NONMEMBER)
    reference = _logits(rng, 300, **NONMEMBER)  # unseen data: the attack's non-member rate
    out = svc_mia(*retain, *test, *forget, seed=3)
    ref = svc_mia(*retain, *test, *reference, seed=3)
    assert out["mia"] > 0.8
    for k in ("mia_confidence", "mia_entropy", "mia_m_entropy", "mia_prob"):
        assert abs(out[k] - ref[k]) < 0.08, (k, out[k], ref[k])
    assert svc_mia(*retain, *test, *forget, seed=3) == out  # seeded: reproducible


def test_svc_mia_empty_forget_is_nan():
    rng = np.random.default_rng(2)
    retain, test = _logits(rng, 50, **MEMBER), _logits(rng, 50, **NONMEMBER)
    out = svc_mia(*retain, *test, np.zeros((0, 10)), np.zeros(0, dtype=int))
    assert all(math.isnan(v) for v in out.values())


# --------------------------------------------------------------------------------- forgetting quality

def test_attack_epsilon_rules():
    fpr = np.array([0.0, 0.0, 0.3, 0.1, 0.5])
    fnr = np.array([0.0, 0.3, 0.0, 0.2, 0.5])
    eps = attack_epsilons(fpr, fnr, delta=0.01)
    assert eps[0] == np.inf                     # perfect separation
    assert np.isnan(eps[1]) and np.isnan(eps[2])  # exactly one rate is 0: discarded
    assert eps[3] == pytest.approx(max(math.log(0.89) - math.log(0.2), math.log(0.79) - math.log(0.1)))
    assert eps[4] == pytest.approx(math.log(0.49) - math.log(0.5))


def test_epsilon_scores_bins():
    scores = epsilon_scores(np.array([0.0, 0.49, 0.5, 2.07, 5.99, 6.0, 100.0, np.inf, -0.3]))
    np.testing.assert_allclose(scores, [1, 1, 0.5, 1 / 16, 2 / 2**12, 2 / 2**13, 2 / 2**13, 2 / 2**13, 1])


def test_example_epsilons_small_cases():
    u = np.array([[1.0, 5.0, 0.0], [2.0, 5.0, 1.0]])
    r = np.array([[3.0, 5.0, 0.5], [4.0, 5.0, 2.0]])
    eps = example_epsilons(u, r)
    assert eps[0] == np.inf      # separable
    assert eps[1] == 0.0         # every model identical: all attacks discarded
    # interleaved u 0, r .5, u 1, r 2: the kept attacks all have eps < 0 (best: FPR = FNR = 1/2 gives
    # log .49 - log .5), so the public list's initial 0 wins
    assert eps[2] == 0.0


def test_forgetting_quality_identical_vs_separable():
    rng = np.random.default_rng(0)
    n_models, m = 512, 40
    r = rng.normal(size=(n_models, m))
    same = forgetting_quality(rng.normal(size=(n_models, m)), r)
    shifted = forgetting_quality(rng.normal(size=(n_models, m)) + 1.0, r)
    apart = forgetting_quality(rng.normal(size=(n_models, m)) + 20.0, r)
    assert same > 0.5
    assert shifted < same / 2
    assert apart == pytest.approx(2 / 2**13)
    assert challenge_score(0.5, 0.9, 1.0, 0.8, 0.9) == pytest.approx(0.4)
    assert challenge_score(0.5, 1.0, 0.9, 1.0, 0.8) > 0.5  # ratios above 1 are not clipped


def test_forgetting_quality_from_logits():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 20)
    logits_r = rng.normal(size=(64, 20, 5))
    logits_u = logits_r.copy()
    logits_u[:, np.arange(20), y] += 30.0   # unlearned models still very sure of the forget labels
    for scalar in ("ce_argmax", "ce_true_label", "logit_true"):
        assert forgetting_quality(logits_u, logits_r, y=y, scalar=scalar) == pytest.approx(2 / 2**13), scalar
    assert forgetting_quality(logits_u, logits_r) == pytest.approx(2 / 2**13)  # ce_argmax needs no labels
    with pytest.raises(ValueError, match="labels"):
        forgetting_quality(logits_u, logits_r, scalar="ce_true_label")


# ------------------------------------------------------------------- forgetting quality: public code

def _public_eps(u: np.ndarray, r: np.ndarray, delta: float = 0.01) -> float:
    """The public scoring code's per-example path, one example at a time (best_threshold_attack then
    compute_epsilon_s), written out as plain loops for comparison."""
    samples = np.concatenate([r, u])
    labels = np.array([0] * len(r) + [1] * len(u))
    per_attack = [0.0]
    for t in sorted(samples):
        pred = samples > t
        fpr = np.sum(pred & (labels == 0)) / np.sum(labels == 0)
        fnr = np.sum(~pred & (labels == 1)) / np.sum(labels == 1)
        if fpr == 0 and fnr == 0:
            per_attack.append(np.inf)
        elif fpr == 0 or fnr == 0:
            continue
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                e1 = np.log(1 - delta - fpr) - np.log(fnr)
                e2 = np.log(1 - delta - fnr) - np.log(fpr)
            per_attack.append(np.inf if np.isnan(e1) and np.isnan(e2) else np.nanmax([e1, e2]))
    return float(np.nanmax(per_attack))


def test_example_epsilons_match_the_public_loop():
    rng = np.random.default_rng(5)
    n, m = 8, 60
    r = rng.normal(size=(n, m))
    u = rng.normal(size=(n, m)) + rng.choice([-3.0, -0.5, 0.0, 0.5, 3.0], size=m)
    u[:, :5] = np.round(u[:, :5])      # ties
    r[:, :5] = np.round(r[:, :5])
    u[:, 5], r[:, 5] = 1.0, 1.0        # all equal
    expected = [_public_eps(u[:, j], r[:, j]) for j in range(m)]
    np.testing.assert_allclose(example_epsilons(u, r), expected)
    assert np.isinf(expected).any() and (np.asarray(expected) == 0).any()   # both special cases covered


def test_public_threshold_attack_is_one_sided_and_the_mirror_is_an_option():
    # unlearned outputs a little below retrained ones: the public attack ("unlearned if > t") misses it
    u = np.array([[0.0], [1.0], [2.0], [3.5]])
    r = np.array([[0.5], [2.5], [3.0], [4.0]])
    assert example_epsilons(u, r)[0] == 0.0
    mirrored = example_epsilons(u, r, attacks=("threshold_mirrored",))[0]
    assert mirrored > 0.5
    # the mirrored attack with cut after 2.0: predicts U for <= 2.0 -> FPR 1/4 (0.5), FNR 1/4 (3.5)
    assert mirrored == pytest.approx(math.log(1 - 0.01 - 0.25) - math.log(0.25))


def test_both_log_terms_nan_means_infinity():
    # FPR = FNR = 1: the mirror image of a perfect separation; both logs have a negative argument
    assert attack_epsilons(np.array([1.0]), np.array([1.0]))[0] == np.inf
    # FPR = 1 - delta exactly: log(0) = -inf, not NaN, so the other term decides
    e = attack_epsilons(np.array([0.99]), np.array([0.5]), delta=0.01)[0]
    assert e == pytest.approx(math.log(1 - 0.01 - 0.5) - math.log(0.99))
    assert np.isnan(attack_epsilons(np.array([np.nan]), np.array([0.5]))[0])  # a repeated cut: discarded


def test_bins_are_the_public_digitize_and_negative_eps_is_clipped():
    eps = np.array([-2.0, 0.0, 0.25, 0.5, 1.0, 5.5, 6.0, np.inf])
    n = np.digitize(np.maximum(eps, 0), np.arange(13) * 0.5)
    np.testing.assert_array_equal(n, [1, 1, 1, 2, 3, 12, 13, 13])
    np.testing.assert_allclose(epsilon_scores(eps), 2.0 / 2.0 ** n)
    assert epsilon_scores(np.array([-2.0]))[0] == 1.0     # the public code (without its initial 0) would give 2
    np.testing.assert_allclose(epsilon_scores(np.array([0.3, 0.3]), bin_width=0.1, n_bins=3), [2 / 2**3] * 2)


def test_output_scalars_hand_computed():
    from rumflow.metrics import output_scalar

    p = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    logits, y = np.log(p), np.array([1, 1])
    np.testing.assert_allclose(output_scalar(logits, y, "ce_argmax"), [-math.log(0.7), -math.log(0.6)])
    np.testing.assert_allclose(output_scalar(logits, y, "ce_true_label"), [-math.log(0.2), -math.log(0.6)])
    np.testing.assert_allclose(output_scalar(logits, y, "logit_true"),
                               [math.log(0.2 / 0.8), math.log(0.6 / 0.4)])
    assert output_scalar(np.stack([logits, logits]), y, "ce_argmax").shape == (2, 2)  # model axis kept
    with pytest.raises(ValueError, match="scalar"):
        output_scalar(logits, y, "softmax")


def test_logistic_attack_matches_sklearn_per_example():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit

    from rumflow.metrics import logistic_attack_rates

    rng = np.random.default_rng(2)
    n, m = 12, 25
    u = rng.normal(size=(n, m)) * 3.0
    r = rng.normal(size=(n, m)) * 3.0 + rng.uniform(0, 6, m)
    fpr, fnr = logistic_attack_rates(u, r)
    for j in range(m):
        x = np.concatenate([r[:, j], u[:, j]]).reshape(-1, 1)
        lab = np.array([0] * n + [1] * n)
        fp, fn = [], []
        for tr, te in StratifiedShuffleSplit(n_splits=3, random_state=0).split(x, lab):
            pred = LogisticRegression(tol=1e-8).fit(x[tr], lab[tr]).predict(x[te])
            fp.append(np.mean(pred[lab[te] == 0] == 1))
            fn.append(np.mean(pred[lab[te] == 1] == 0))
        assert fpr[0, j] == pytest.approx(np.mean(fp)) and fnr[0, j] == pytest.approx(np.mean(fn)), j
    both = example_epsilons(u, r, attacks=("threshold", "logistic"))
    assert (both >= example_epsilons(u, r)).all()  # one more attack can only raise the max
    with pytest.raises(ValueError, match="attacks"):
        example_epsilons(u, r, attacks=("svm",))


# ------------------------------------------------------------------------------------ 004's F-score

def test_f_score_004_hand_computed():
    from rumflow.metrics import f_score_004

    def logits_with_p0(p0: np.ndarray) -> np.ndarray:
        """Two-class logits whose softmax class-0 probability is p0 ([N, M])."""
        return np.stack([np.log(p0), np.log(1 - p0)], axis=-1)

    # example 0: every model gives p0 = 0.55 -> every threshold attack has FPR or FNR 0 (discarded) and
    # the Gaussian attack has no spread: eps = -inf, h = 2 / 2**1 = 1
    # example 1: retrained p0 = .95, unlearned p0 = .05 (spread by +-.01): threshold .5 separates
    # perfectly (FPR = FNR = 0): eps = inf, h = 2 / 2**13
    p_r = np.array([[0.55, 0.94], [0.55, 0.96]])
    p_u = np.array([[0.55, 0.04], [0.55, 0.06]])
    got = f_score_004(logits_with_p0(p_u), logits_with_p0(p_r))
    assert got == pytest.approx((1.0 + 2 / 2**13) / 2)
    # one example, 4 models each: U p0 {.15, .25, .45, .55}, R {.35, .5, .65, .85}; "retrain" if p0 > t.
    # Kept threshold attack: t = .5 only (FPR = 1/4: U .55; FNR = 2/4: R .35, .5), eps = max(log(.65/.5),
    # log(.4/.25)) = log 1.6; every other t has FPR or FNR 0.
    p_u = np.array([[0.15], [0.25], [0.45], [0.55]])
    p_r = np.array([[0.35], [0.5], [0.65], [0.85]])
    # The Gaussian attack: the crossing points of N(.35, sd_u) and N(.5875, sd_r) (np.std), then 004's rule
    m0, s0, m1, s1 = p_u.mean(), p_u.std(), p_r.mean(), p_r.std()
    a = 1 / (2 * s0**2) - 1 / (2 * s1**2)
    b = m1 / s1**2 - m0 / s0**2
    c = m0**2 / (2 * s0**2) - m1**2 / (2 * s1**2) - math.log(s1 / s0)
    t0, t1 = sorted(np.roots([a, b, c]).real)
    dens = lambda x, m, s: math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))  # noqa: E731
    below = dens(t0 + 0.01, m0, s0) > dens(t0 + 0.01, m1, s1)
    rule = (lambda x: x <= t1) if below else (lambda x: t0 <= x <= t1)  # noqa: E731
    g_fpr = np.mean([rule(x) for x in p_u[:, 0]])
    g_fnr = 1 - np.mean([rule(x) for x in p_r[:, 0]])
    from rumflow.metrics import _gaussian_attack_004
    np.testing.assert_allclose(np.concatenate(_gaussian_attack_004(p_r, p_u))[:, 0], [g_fpr, g_fnr])
    g_eps = max(math.log(0.9 - g_fpr) - math.log(g_fnr), math.log(0.9 - g_fnr) - math.log(g_fpr))
    eps = max(math.log(1.6), g_eps)
    expected = 2 / 2 ** (12 / (1 + math.exp(-eps)) + 1)
    assert f_score_004(logits_with_p0(p_u), logits_with_p0(p_r)) == pytest.approx(expected)


def test_forgetting_quality_config_defaults_and_errors():
    from pydantic import ValidationError

    from rumflow.config import ExperimentConfig

    fq = ExperimentConfig().evaluate.forgetting_quality
    assert (fq.delta, fq.bin_width, fq.n_bins, fq.scalar, fq.attacks) == (0.01, 0.5, 13, "ce_argmax", ("threshold",))
    ok = ExperimentConfig.model_validate({"evaluate": {"forgetting_quality": {"attacks": ["threshold", "logistic"],
                                                                               "scalar": "logit_true"}}})
    assert ok.evaluate.forgetting_quality.attacks == ("threshold", "logistic")
    for bad in ({"attacks": ["svm"]}, {"attacks": []}, {"scalar": "prob"}, {"delta": 1.5}):
        with pytest.raises(ValidationError):
            ExperimentConfig.model_validate({"evaluate": {"forgetting_quality": bad}})


# ------------------------------------------------------------------------ delta MIA and efficiency

def test_delta_mia_and_efficient_from_known_rows():
    gaps = dict(mia_correctness=0.1, mia_confidence=0.2, mia_entropy=0.3, mia_m_entropy=0.9, mia_prob=0.4)
    rows = [
        _row("original", 0, "mix", True, **gaps),
        _row("retrain", 1, "mix", True, seconds=10.0, retrain_seconds=10.0, **gaps),
        # gaps to the retrain row: .05, .10, .20, .30 (m_entropy's .5 is not among 004's four features)
        _row("vanilla", 1, "mix", True, seconds=2.0, seconds_step=2.0, retrain_seconds=10.0,
             mia_correctness=0.15, mia_confidence=0.1, mia_entropy=0.5, mia_m_entropy=0.4, mia_prob=0.7),
        _row("rum", 1, "high", True, seconds=1.0, seconds_step=3.0, retrain_seconds=10.0,
             **{**gaps, "mia_prob": np.nan}),
    ]
    out = add_derived_columns(pd.DataFrame(rows))
    mean, mx, eff = (out[c].to_numpy() for c in ("delta_mia_mean", "delta_mia_max", "efficient"))
    assert np.isnan(mean[0]) and np.isnan(mx[0]) and np.isnan(eff[0])    # original: no reference
    assert mean[1] == 0.0 and mx[1] == 0.0                                # retrain vs itself, computed
    assert mean[2] == pytest.approx((0.05 + 0.1 + 0.2 + 0.3) / 4) and mx[2] == pytest.approx(0.3)
    assert np.isnan(mean[3]) and np.isnan(mx[3])                          # a NaN feature is not a 0 gap
    assert eff[1] == 0.0                    # retraining takes 100% of retraining: not efficient
    assert eff[2] == 1.0                    # rte_step .2 <= .2
    assert eff[3] == 0.0                    # rte .1 but rte_step .3: the whole RUM step counts
    # a table without MIA columns (MIA never run) gets NaN gaps, and no new mia_* columns
    bare = pd.DataFrame([_row("retrain", 1, "mix", True), _row("vanilla", 1, "mix", True)])
    res = add_derived_columns(bare)
    assert res["delta_mia_mean"].isna().all() and not any(c.startswith("mia_") for c in res.columns)


# ------------------------------------------------------------------------ seed 001's loss metrics

def test_nomus_and_forgetting_score_hand_computed():
    from rumflow.metrics import mia_forgetting_score, nomus

    assert mia_forgetting_score(0.5445) == pytest.approx(0.0445)   # the retrained MUFAC model's FS
    assert mia_forgetting_score(0.3) == pytest.approx(0.2)
    assert nomus(0.8, 0.1) == pytest.approx((0.8 + 1 - 0.2) / 2)
    assert nomus(0.6, 0.0) == pytest.approx(0.8) and nomus(0.0, 0.5) == 0.0
    assert math.isnan(nomus(0.8, float("nan")))


def test_top2_accuracy_hand_computed():
    from rumflow.metrics import topk_accuracy

    logits = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    y = np.array([0, 1, 2, 1])
    assert topk_accuracy(logits, y, 2) == pytest.approx(3 / 4)
    assert topk_accuracy(logits, y, 1) == pytest.approx(1 / 4)
    assert topk_accuracy(logits[:, :1], y[:1] * 0, 2) == 1.0      # fewer classes than k
    assert math.isnan(topk_accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int)))


def test_per_example_ce_hand_computed():
    from rumflow.metrics import per_example_ce

    p = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    np.testing.assert_allclose(per_example_ce(np.log(p) + 3.0, np.array([0, 2])), [-math.log(0.7), -math.log(0.1)])


def test_loss_mia_chance_separable_and_too_small():
    from rumflow.metrics import loss_mia

    rng = np.random.default_rng(0)
    same = loss_mia(rng.exponential(size=400), rng.exponential(size=400))
    assert abs(same - 0.5) < 0.1
    apart = loss_mia(rng.uniform(0, 0.1, 300), rng.uniform(2, 3, 300))
    assert apart == 1.0
    # unbalanced sets are balanced first: 30 forget losses near 0 vs 3000 test losses near 0 -> chance,
    # not the 99% an unbalanced classifier would get by always answering "test"
    unbalanced = loss_mia(rng.exponential(size=30), rng.exponential(size=3000))
    assert abs(unbalanced - 0.5) < 0.2
    assert math.isnan(loss_mia(np.zeros(5), np.ones(100)))           # too few for a stratified 10% fold


def test_loss_mia_caps_examples_with_a_seed():
    from rumflow.metrics import loss_mia

    rng = np.random.default_rng(3)
    f, u = rng.exponential(size=5000), rng.exponential(size=5000) * 1.5
    a = loss_mia(f, u, max_per_class=200, seed=4)
    assert a == loss_mia(f, u, max_per_class=200, seed=4)           # seeded
    assert a != loss_mia(f, u, max_per_class=200, seed=5)           # the cap really subsamples


def test_js_distance_identical_far_and_a_direct_computation():
    from scipy.stats import norm

    from rumflow.metrics import loss_js_distance

    rng = np.random.default_rng(0)
    a = rng.exponential(size=200)
    assert loss_js_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-7)
    far = loss_js_distance(rng.normal(0, 0.1, 200), rng.normal(50, 0.1, 200))
    assert far == pytest.approx(math.sqrt(math.log(2)), rel=1e-6)    # disjoint supports: the maximum
    # a direct computation: Gaussian KDE with Scott's factor n^(-1/5) on a 1000-point grid, JS with ln
    f, t = rng.normal(0, 1, 40), rng.normal(1, 2, 60)
    x = np.linspace(min(f.min(), t.min()), max(f.max(), t.max()), 1000)

    def kde(s: np.ndarray) -> np.ndarray:
        h = s.std(ddof=1) * len(s) ** (-1 / 5)
        d = norm.pdf((x[:, None] - s[None]) / h).sum(axis=1)
        return d / d.sum()

    p, q = kde(f), kde(t)
    m = (p + q) / 2
    js = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert loss_js_distance(f, t) == pytest.approx(math.sqrt(js), rel=1e-6)
    assert math.isnan(loss_js_distance(np.ones(10), t))               # one distinct value: no KDE
    assert math.isnan(loss_js_distance(np.zeros(0), t))


def test_cv_logistic_accuracy_is_sklearns_cross_val_score():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    from rumflow.metrics import cv_logistic_accuracy

    rng = np.random.default_rng(7)
    for n, shift, scale in ((6, 0.5, 1.0), (40, 1.0, 0.01), (300, 0.3, 50.0), (25, 10.0, 1.0)):
        x = np.concatenate([rng.exponential(size=n), rng.exponential(size=n) + shift]) * scale
        y = np.array([0] * n + [1] * n)
        ref = cross_val_score(LogisticRegression(), x[:, None], y,
                              cv=StratifiedShuffleSplit(n_splits=10, random_state=0), scoring="accuracy").mean()
        assert cv_logistic_accuracy(x, y) == pytest.approx(ref), (n, shift, scale)
