"""Evaluation metrics (SPEC section 7, SEED_METHODS section 6): ToW, ToW-MIA, the SVC membership-inference
attack, the MUFAC/MUCAC metrics of seed 001 (loss MIA, forgetting score, NoMUS, top-2 accuracy, JS
distance of loss distributions), the NeurIPS 2023 forgetting quality and 004's F-score variant, and
`add_derived_columns`, the one function that turns raw per-row measurements into columns compared with
the step's retrain reference (used by the flow and by report regeneration alike). No Prefect here.
docs/metrics.md documents every column."""
from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd

# Probabilities are clamped to this before a log (as in Song & Mittal's code), so every feature is finite.
LOG_CLAMP = 1e-30

MIA_FEATURES = ("correctness", "confidence", "entropy", "m_entropy", "prob")
# 004's MIA table uses these four (m_entropy is commented out in its code); its "best attack" column is
# the mean of the four absolute gaps to the retrain model (SEED_METHODS 6.4).
DELTA_MIA_FEATURES = ("correctness", "confidence", "entropy", "prob")
# NeurIPS 2023 efficiency rule: an unlearning run slower than this fraction of retraining is rejected.
EFFICIENT_RTE = 0.2


def tow(forget_u, retain_u, test_u, forget_r, retain_r, test_r):
    """Tug of war: (1-|FA_u-FA_r|)(1-|RA_u-RA_r|)(1-|TA_u-TA_r|), accuracies as fractions (arrays ok)."""
    f = [np.asarray(a, dtype=np.float64) for a in (forget_u, retain_u, test_u, forget_r, retain_r, test_r)]
    return (1 - np.abs(f[0] - f[3])) * (1 - np.abs(f[1] - f[4])) * (1 - np.abs(f[2] - f[5]))


def tow_mia(mia_u, retain_u, test_u, mia_r, retain_r, test_r):
    """ToW with the forget accuracy replaced by MIA efficacy."""
    return tow(mia_u, retain_u, test_u, mia_r, retain_r, test_r)


# --------------------------------------------------------------------------------------------------
# Derived columns of steps.parquet
# --------------------------------------------------------------------------------------------------

DERIVED_COLUMNS = ("tow", "tow_mia", "delta_mia_mean", "delta_mia_max", "rte", "rte_step", "efficient")
_REF_COLUMNS = ("acc_forget", "acc_retain", "acc_test", "mia", "seconds")
_GAP_COLUMNS = tuple(f"mia_{f}" for f in DELTA_MIA_FEATURES)


def mia_gaps(mia_u: np.ndarray, mia_r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, max) over features of |MIA_u - MIA_r|; inputs [rows, features]; NaN in a row gives NaN."""
    gap = np.abs(np.asarray(mia_u, dtype=np.float64) - np.asarray(mia_r, dtype=np.float64))
    return gap.mean(axis=1), gap.max(axis=1)


def _float_column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A column as float64, or all NaN where the table does not have it (e.g. a table from before it)."""
    return df[name].to_numpy(dtype=np.float64) if name in df.columns else np.full(len(df), np.nan)


def add_derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of a steps table with the DERIVED_COLUMNS (re)computed.

    Every row is compared with the retrain row (strategy "retrain") of the same (seed, proxy, step), and
    of the same run when a `run` column is present. Retrain against itself gives tow = tow_mia = 1 and
    delta_mia_mean = delta_mia_max = 0 exactly (computed, not filled in). The original model's rows
    (step 0) and rows whose step has no retrain row get NaN for these. delta_mia_* are the mean and max
    over DELTA_MIA_FEATURES of |mia_<f> - mia_<f> of the retrain row| (NaN when a feature is NaN or
    absent, e.g. with the MIA off). rte = seconds / retrain_seconds and rte_step = seconds_step /
    retrain_seconds; a missing `retrain_seconds` is taken from the reference row's `seconds`.
    efficient = 1.0 where rte_step <= EFFICIENT_RTE (the NeurIPS 2023 rule), 0.0 where slower, NaN where
    rte_step is unknown and on the original rows (a float so that summaries average it over seeds).
    Row order and all other columns are kept; existing derived columns are overwritten.
    """
    keys = [k for k in ("run", "seed", "proxy", "step") if k in df.columns]
    missing = {"seed", "proxy", "step", "strategy", *_REF_COLUMNS} - set(df.columns)
    if missing:
        raise ValueError(f"steps table lacks columns {sorted(missing)}; it must come from the flow's evaluate step")
    out = df.copy()
    ref_cols = list(_REF_COLUMNS) + list(_GAP_COLUMNS)
    # absent MIA features read as NaN on both sides, so their gaps are NaN, never 0
    values = pd.DataFrame({c: _float_column(out, c) for c in ref_cols}, index=out.index)
    table = pd.concat([out[keys + ["strategy"]], values], axis=1)
    ref = table.loc[table["strategy"] == "retrain", keys + ref_cols]
    dup = ref.duplicated(keys, keep=False)
    if dup.any():
        raise ValueError("steps table has more than one retrain row for "
                         f"{ref.loc[dup, keys].drop_duplicates().to_dict('records')[:3]}; "
                         "each (seed, proxy, step) needs exactly one retrain reference")
    ref = ref.rename(columns={c: f"_ref_{c}" for c in ref_cols})
    joined = out[keys].reset_index(drop=True).merge(ref, on=keys, how="left", validate="many_to_one")
    r = {c: joined[f"_ref_{c}"].to_numpy(dtype=np.float64) for c in ref_cols}
    col = {c: values[c].to_numpy() for c in ref_cols}
    out["tow"] = tow(col["acc_forget"], col["acc_retain"], col["acc_test"],
                     r["acc_forget"], r["acc_retain"], r["acc_test"])
    out["tow_mia"] = tow_mia(col["mia"], col["acc_retain"], col["acc_test"],
                             r["mia"], r["acc_retain"], r["acc_test"])
    out["delta_mia_mean"], out["delta_mia_max"] = mia_gaps(np.stack([col[c] for c in _GAP_COLUMNS], axis=1),
                                                           np.stack([r[c] for c in _GAP_COLUMNS], axis=1))
    original = (out["strategy"] == "original").to_numpy()
    # the model before any request has no reference
    out.loc[original, ["tow", "tow_mia", "delta_mia_mean", "delta_mia_max"]] = np.nan
    retrain_s = _float_column(out, "retrain_seconds")
    retrain_s = np.where(np.isnan(retrain_s), r["seconds"], retrain_s)
    seconds_step = out["seconds_step"].to_numpy(dtype=np.float64) if "seconds_step" in out.columns else col["seconds"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["rte"] = np.where(retrain_s > 0, col["seconds"] / retrain_s, np.nan)
        out["rte_step"] = np.where(retrain_s > 0, seconds_step / retrain_s, np.nan)
    rte_step = out["rte_step"].to_numpy(dtype=np.float64)
    out["efficient"] = np.where(np.isnan(rte_step) | original, np.nan, (rte_step <= EFFICIENT_RTE).astype(np.float64))
    return out


# --------------------------------------------------------------------------------------------------
# Membership inference (SVC attack of SalUn / RUM)
# --------------------------------------------------------------------------------------------------

def _numpy(a: Any) -> np.ndarray:
    """A numpy copy of a numpy array or a (possibly CUDA, grad-tracking) torch tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = _numpy(logits).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def modified_entropy(prob: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Song & Mittal's modified entropy, per row:
    Mentr = -(1 - p_y) log(p_y) - sum_{c != y} p_c log(1 - p_c), with p and 1 - p clamped to LOG_CLAMP.
    Only the true class y of each row takes the first form (RUM/SalUn's code replaced whole columns
    `[:, y]` for every label in the batch instead)."""
    p = np.asarray(prob, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    rows = np.arange(len(y))
    p_y = p[rows, y]
    log_1mp = np.log(np.maximum(1.0 - p, LOG_CLAMP))
    other = p * log_1mp
    other[rows, y] = 0.0
    return -(1.0 - p_y) * np.log(np.maximum(p_y, LOG_CLAMP)) - other.sum(axis=1)


def mia_features(logits: Any, y: Any) -> dict[str, np.ndarray]:
    """The five per-example attack features of `logits` [N, C] with labels `y` [N]:
    correctness (0/1), confidence p[y], entropy, m_entropy (modified entropy), prob (softmax, [N, C])."""
    p = softmax(logits)
    y = _numpy(y).astype(np.int64)
    rows = np.arange(len(y))
    p_y = p[rows, y]
    return {
        "correctness": (p.argmax(axis=1) == y).astype(np.float64),
        "confidence": p_y,
        "entropy": -(p * np.log(np.maximum(p, LOG_CLAMP))).sum(axis=1),
        "m_entropy": modified_entropy(p, y),
        "prob": p,
    }


def svc_mia(retain_logits: Any, retain_y: Any, test_logits: Any, test_y: Any, forget_logits: Any,
            forget_y: Any, max_shadow: int = 10000, seed: int = 0) -> dict[str, float]:
    """MIA efficacy of the SVC attack (SalUn / RUM): the fraction of D_f predicted non-member.

    Shadow members are min(max_shadow, |D_r|, |D_test|) examples of D_r drawn without replacement
    (label 1); shadow non-members as many examples of D_test (label 0), so the classes are balanced.
    Per feature an `SVC(C=3, gamma="auto", kernel="rbf")` is fit on the shadow set and predicts D_f.
    Returns mia_correctness, mia_confidence, mia_entropy, mia_m_entropy, mia_prob and mia (= the
    confidence one). NaN when D_f or the shadow set is empty.
    """
    from sklearn.svm import SVC

    rl, ry = _numpy(retain_logits), _numpy(retain_y)
    tl, ty = _numpy(test_logits), _numpy(test_y)
    fl, fy = _numpy(forget_logits), _numpy(forget_y)
    n = min(int(max_shadow), len(ry), len(ty))
    keys = [f"mia_{f}" for f in MIA_FEATURES]
    if n == 0 or len(fy) == 0:
        out = {k: float("nan") for k in keys}
        out["mia"] = out["mia_confidence"]
        return out
    rng = np.random.default_rng(seed)
    ri = np.sort(rng.choice(len(ry), size=n, replace=False))
    ti = np.sort(rng.choice(len(ty), size=n, replace=False))
    member = mia_features(rl[ri], ry[ri])
    nonmember = mia_features(tl[ti], ty[ti])
    target = mia_features(fl, fy)
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    out: dict[str, float] = {}
    for name in MIA_FEATURES:
        x_shadow = np.concatenate([member[name], nonmember[name]]).reshape(2 * n, -1)
        x_target = target[name].reshape(len(fy), -1)
        clf = SVC(C=3, gamma="auto", kernel="rbf")
        clf.fit(x_shadow, labels)
        out[f"mia_{name}"] = float(1.0 - clf.predict(x_target).mean())
    out["mia"] = out["mia_confidence"]
    return out


# --------------------------------------------------------------------------------------------------
# Seed 001's MUFAC/MUCAC metrics: loss MIA, forgetting score, NoMUS, top-2 accuracy, loss JS distance
# --------------------------------------------------------------------------------------------------

LOSS_MIA_SPLITS = 10   # StratifiedShuffleSplit(n_splits=10, random_state=0), as in the NeurIPS starting kit
LOSS_MIA_MIN = 6       # per class: the smallest set whose 10% test fold holds both classes
JS_GRID = 1000         # points of the grid the two loss densities are evaluated on


def per_example_ce(logits: Any, y: Any) -> np.ndarray:
    """Cross-entropy of each row of `logits` [N, C] with its label, in float64."""
    z = _numpy(logits).astype(np.float64)
    y = _numpy(y).astype(np.int64)
    if len(y) == 0:
        return np.zeros(0)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


def topk_accuracy(logits: Any, y: Any, k: int = 2) -> float:
    """Fraction of rows whose label is among the k largest logits (NaN for no rows)."""
    z, y = _numpy(logits), _numpy(y).astype(np.int64)
    if len(y) == 0:
        return float("nan")
    k = min(k, z.shape[1])
    top = np.argpartition(-z, k - 1, axis=1)[:, :k]  # ties broken arbitrarily, as torch.topk does
    return float((top == y[:, None]).any(axis=1).mean())


def _subsample(a: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n elements of `a` drawn without replacement (all of them, in a random order, when n = len(a))."""
    return a[rng.permutation(len(a))[:n]]


def cv_logistic_accuracy(x: np.ndarray, y: np.ndarray, n_splits: int = LOSS_MIA_SPLITS, random_state: int = 0) -> float:
    """`cross_val_score(LogisticRegression(), x, y, cv=StratifiedShuffleSplit(n_splits, random_state=...),
    scoring="accuracy").mean()` for 1-D x, with the fits of all folds solved at once (`_fit_logistic_1d`,
    the same objective as sklearn's default lbfgs fit, to its tolerance)."""
    from sklearn.model_selection import StratifiedShuffleSplit

    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y)
    folds = list(StratifiedShuffleSplit(n_splits=n_splits, random_state=random_state).split(x[:, None], y))
    train = np.stack([tr for tr, _ in folds], axis=1)     # [n_train, folds]: every fold has the same sizes
    test = np.stack([te for _, te in folds], axis=1)
    w, b = _fit_logistic_1d(x[train], y[train].astype(np.float64))
    pred = (w * x[test] + b) > 0                          # sklearn: class 1 where the decision is > 0
    return float((pred == (y[test] == 1)).mean())


def loss_mia(forget_losses: Any, test_losses: Any, max_per_class: int = 10000, seed: int = 0) -> float:
    """Seed 001's logistic-regression loss MIA: cross-validated accuracy of telling forget from test losses.

    Both sets are subsampled (seeded) to n = min(|D_f|, |D_test|, max_per_class) examples, so the two
    classes are balanced and 0.5 is chance (the reference truncates D_f to |D_u|, which balances only
    when D_f is the larger set). X = the losses, y = 1 for forget and 0 for test; the accuracy of
    `LogisticRegression()` under `StratifiedShuffleSplit(n_splits=10, random_state=0)` (10% test folds),
    averaged over the folds (`cv_logistic_accuracy`). NaN when n < LOSS_MIA_MIN (no test fold could
    hold both classes).
    """
    f = np.asarray(_numpy(forget_losses), dtype=np.float64).ravel()
    u = np.asarray(_numpy(test_losses), dtype=np.float64).ravel()
    n = min(len(f), len(u), int(max_per_class))
    if n < LOSS_MIA_MIN:
        return float("nan")
    rng = np.random.default_rng(seed)
    x = np.concatenate([_subsample(u, n, rng), _subsample(f, n, rng)])
    y = np.concatenate([np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)])
    return cv_logistic_accuracy(x, y)


def mia_forgetting_score(mia: float) -> float:
    """Seed 001's forgetting score |MIA - 0.5| (lower is better; NaN stays NaN)."""
    return abs(float(mia) - 0.5)


def nomus(test_acc: float, forgetting_score: float, lam: float = 0.5) -> float:
    """NoMUS = lam * TestAcc + (1 - lam) * (1 - 2 * FS); with lam = 0.5, (TestAcc + 1 - 2 FS) / 2."""
    return float(lam * test_acc + (1.0 - lam) * (1.0 - 2.0 * forgetting_score))


def loss_js_distance(forget_losses: Any, test_losses: Any, max_points: int = 10000, seed: int = 0,
                     grid: int = JS_GRID) -> float:
    """Jensen-Shannon distance between the forget and test loss distributions (001's GLI code).

    Each set is estimated by `scipy.stats.gaussian_kde` (Gaussian kernel, Scott's bandwidth) on at most
    `max_points` losses (a seeded subsample above that, to bound the cost), evaluated on `grid` evenly
    spaced points from the smallest to the largest loss of the two sets, and normalised to sum 1; the
    score is `scipy.spatial.distance.jensenshannon` of the two vectors: the square root of the JS
    divergence, natural log, in [0, sqrt(log 2)]. 0 for identical samples. NaN when a set has fewer than
    two distinct losses (the KDE is undefined) or a density vanishes on the grid.
    """
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(seed)
    sets = []
    for a in (forget_losses, test_losses):
        a = np.asarray(_numpy(a), dtype=np.float64).ravel()
        if len(a) > max_points:
            a = _subsample(a, int(max_points), rng)
        if len(np.unique(a)) < 2:
            return float("nan")
        sets.append(a)
    both = np.concatenate(sets)
    x = np.linspace(both.min(), both.max(), grid)
    dens = [gaussian_kde(a)(x) for a in sets]
    if any(not np.isfinite(d).all() or d.sum() <= 0 for d in dens):
        return float("nan")
    p, q = (d / d.sum() for d in dens)
    return float(jensenshannon(p, q))


def mufac_metrics(forget_logits: Any, forget_y: Any, test_logits: Any, test_y: Any, max_examples: int = 10000,
                  seed: int = 0) -> dict[str, float]:
    """Seed 001's metrics of one model: mia_lr, forgetting_score, nomus, acc_test_top2, js_forget_test."""
    lf, lt = per_example_ce(forget_logits, forget_y), per_example_ce(test_logits, test_y)
    test_y = _numpy(test_y)
    acc_test = float((_numpy(test_logits).argmax(axis=1) == test_y).mean()) if len(test_y) else float("nan")
    mia = loss_mia(lf, lt, max_examples, seed)
    fs = mia_forgetting_score(mia)
    return {"mia_lr": mia, "forgetting_score": fs, "nomus": nomus(acc_test, fs),
            "acc_test_top2": topk_accuracy(test_logits, test_y, 2),
            "js_forget_test": loss_js_distance(lf, lt, max_examples, seed)}


# --------------------------------------------------------------------------------------------------
# Forgetting quality (NeurIPS 2023 unlearning challenge; the public scoring code's defaults)
# --------------------------------------------------------------------------------------------------

FQ_DELTA = 0.01       # delta of (eps, delta)-unlearning used in the eps estimate
FQ_BIN_WIDTH = 0.5    # eps bins [0, .5), [.5, 1), ...: bin index 1, 2, ...
FQ_N_BINS = 13        # the last bin (13) takes eps >= 6 and eps = inf; score 2 / 2**bin in [2**-12, 1]
FQ_LR_SPLITS = 3      # the public logistic_regression_attack: StratifiedShuffleSplit(n_splits=3, random_state=0)

Scalar = Literal["ce_argmax", "ce_true_label", "logit_true"]
Attack = Literal["threshold", "threshold_mirrored", "logistic"]
SCALARS: tuple[str, ...] = ("ce_argmax", "ce_true_label", "logit_true")
ATTACKS: tuple[str, ...] = ("threshold", "threshold_mirrored", "logistic")


def _log_softmax(logits: Any) -> np.ndarray:
    """log softmax over the last axis, float64."""
    z = _numpy(logits).astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logit_confidence(logits: Any, y: Any) -> np.ndarray:
    """log(p_y) - log(1 - p_y) of each row of `logits` [..., C] (the scalar `logit_true`); accepts a
    leading model axis, e.g. logits [N_models, M, C] with y [M]."""
    z = _numpy(logits).astype(np.float64)
    y = _numpy(y).astype(np.int64)
    z = z - z.max(axis=-1, keepdims=True)
    zy = np.take_along_axis(z, np.broadcast_to(y[..., None], z.shape[:-1] + (1,)), axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, np.broadcast_to(y[..., None], z.shape[:-1] + (1,)), -np.inf, axis=-1)
    m = others.max(axis=-1, keepdims=True)
    lse_others = m[..., 0] + np.log(np.exp(others - m).sum(axis=-1))
    return zy - lse_others


def output_scalar(logits: Any, y: Any, scalar: str = "ce_argmax") -> np.ndarray:
    """The per-model, per-example scalar the attacks separate, from logits [..., M, C] and labels y [M]:
    `ce_argmax` = CE with the model's own argmax = -log max softmax (the public code's cross_entropy_f,
    label-free), `ce_true_label` = -log p_y, `logit_true` = log p_y - log(1 - p_y)."""
    if scalar == "logit_true":
        return logit_confidence(logits, y)
    logp = _log_softmax(logits)
    if scalar == "ce_argmax":
        return -logp.max(axis=-1)
    if scalar == "ce_true_label":
        y = _numpy(y).astype(np.int64)
        return -np.take_along_axis(logp, np.broadcast_to(y[..., None], logp.shape[:-1] + (1,)), axis=-1)[..., 0]
    raise ValueError(f"unknown forgetting-quality scalar {scalar!r}; use one of {', '.join(SCALARS)}")


def threshold_attack_rates(unlearned: np.ndarray, retrained: np.ndarray,
                           mirrored: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FPR and FNR of every threshold attack on a scalar, per example (the public best_threshold_attack).

    `unlearned` [N_u, M] and `retrained` [N_r, M] hold one scalar per model and forget example; labels
    R = 0, U = 1. For every observed value t of the pooled 2N values the attack predicts "unlearned" for
    values > t. Returns (fpr, fnr), each [N_u + N_r, M], row k = the cut after the k-th smallest value;
    a cut inside a run of tied values repeats the attack of the run's last value and is NaN here
    (a repeat cannot change a maximum). `mirrored` appends the opposite attacks ("unlearned" for
    values <= t): (1 - FPR, 1 - FNR), which the public code does not try.
    """
    u = np.asarray(unlearned, dtype=np.float64)
    r = np.asarray(retrained, dtype=np.float64)
    if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
        raise ValueError("unlearned and retrained outputs must be [N_models, M_examples] with the same M")
    nu, nr = u.shape[0], r.shape[0]
    pooled = np.concatenate([u, r], axis=0)
    is_u = np.concatenate([np.ones_like(u), np.zeros_like(r)], axis=0)
    order = np.argsort(pooled, axis=0, kind="stable")
    v = np.take_along_axis(pooled, order, axis=0)
    lab = np.take_along_axis(is_u, order, axis=0)
    u_le = np.cumsum(lab, axis=0)                      # [T, M]: u among the k+1 smallest
    r_le = np.cumsum(1.0 - lab, axis=0)
    last_of_run = np.ones_like(u_le, dtype=bool)
    last_of_run[:-1] = v[1:] != v[:-1]
    fnr = np.where(last_of_run, u_le / nu, np.nan)       # u at or below t are missed
    fpr = np.where(last_of_run, (nr - r_le) / nr, np.nan)  # r above t are flagged
    if mirrored:
        return np.concatenate([fpr, 1.0 - fpr]), np.concatenate([fnr, 1.0 - fnr])
    return fpr, fnr


def _fit_logistic_1d(x: np.ndarray, y: np.ndarray, c: float = 1.0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Batched 1-D L2 logistic regression (sklearn's LogisticRegression() objective: 0.5 w^2 + C sum of
    log-losses, intercept unpenalised) by damped Newton steps; x, y [n, P] -> (w, b), each [P]."""
    from scipy.special import expit

    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    xs = (x - mu) / sd                                  # solve in standardised units: w = w_s / sd
    s = 2.0 * y - 1.0
    w, b = np.zeros(x.shape[1]), np.zeros(x.shape[1])

    def objective(w_: np.ndarray, b_: np.ndarray, cols: Any = slice(None)) -> np.ndarray:
        z = w_ * xs[:, cols] + b_
        return 0.5 * (w_ / sd[cols]) ** 2 + c * np.logaddexp(0.0, -s[:, cols] * z).sum(axis=0)

    for _ in range(iters):
        p = expit(w * xs + b)
        g_w = w / sd ** 2 + c * ((p - y) * xs).sum(axis=0)
        g_b = c * (p - y).sum(axis=0)
        h = p * (1 - p)
        h_ww = 1.0 / sd ** 2 + c * (h * xs * xs).sum(axis=0)
        h_wb = c * (h * xs).sum(axis=0)
        h_bb = c * h.sum(axis=0) + 1e-12
        det = h_ww * h_bb - h_wb ** 2
        d_w = -(h_bb * g_w - h_wb * g_b) / det
        d_b = -(h_ww * g_b - h_wb * g_w) / det
        # damped Newton: halve the step (up to 1/32, then 0) only for the problems where it raised the objective
        now, t = objective(w, b), np.ones_like(w)
        bad = np.flatnonzero(objective(w + d_w, b + d_b) > now + 1e-12)
        for step in 0.5 ** np.arange(1, 6):
            if bad.size == 0:
                break
            t[bad] = step
            bad = bad[objective(w[bad] + step * d_w[bad], b[bad] + step * d_b[bad], bad) > now[bad] + 1e-12]
        t[bad] = 0.0
        w, b = w + t * d_w, b + t * d_b
        if np.all(np.abs(t * d_w) + np.abs(t * d_b) < 1e-9):  # converged everywhere (standardised units)
            break
    return w / sd, b - w * mu / sd


def logistic_attack_rates(unlearned: np.ndarray, retrained: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The public logistic_regression_attack on every example at once: samples = R then U (labels 0, 1),
    StratifiedShuffleSplit(n_splits=3, random_state=seed) (the same folds for every example, since they
    depend only on the labels), LogisticRegression() fit on each train fold, FPR and FNR on each test
    fold, averaged over folds. Returns (fpr, fnr), each [1, M]."""
    from sklearn.model_selection import StratifiedShuffleSplit

    u, r = np.asarray(unlearned, dtype=np.float64), np.asarray(retrained, dtype=np.float64)
    x = np.concatenate([r, u], axis=0)
    y = np.concatenate([np.zeros(len(r)), np.ones(len(u))])
    fprs, fnrs = [], []
    for train, test in StratifiedShuffleSplit(n_splits=FQ_LR_SPLITS, random_state=seed).split(x[:, :1], y):
        yt = np.broadcast_to(y[train, None], (len(train), x.shape[1]))
        w, b = _fit_logistic_1d(x[train], yt)
        pred = (w * x[test] + b) > 0
        neg, pos = y[test] == 0, y[test] == 1
        fprs.append(pred[neg].mean(axis=0))
        fnrs.append((~pred[pos]).mean(axis=0))
    return np.mean(fprs, axis=0)[None], np.mean(fnrs, axis=0)[None]


def attack_epsilons(fpr: np.ndarray, fnr: np.ndarray, delta: float = FQ_DELTA) -> np.ndarray:
    """eps of each attack, as the public compute_epsilon_s: FPR = FNR = 0 gives inf; exactly one of them
    0 discards the attack (NaN); otherwise eps1 = log(1-delta-FPR) - log(FNR), eps2 = log(1-delta-FNR) -
    log(FPR) (a negative log argument gives NaN, a zero one -inf), eps = their NaN-max, and inf when both
    are NaN (both rates above 1 - delta: the mirror of a perfect separation). NaN rates (repeated cuts)
    are discarded."""
    fpr = np.asarray(fpr, dtype=np.float64)
    fnr = np.asarray(fnr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(1.0 - delta - fpr) - np.log(fnr)
        e2 = np.log(1.0 - delta - fnr) - np.log(fpr)
    both_nan = np.isnan(e1) & np.isnan(e2)
    eps = np.where(both_nan, np.inf, np.fmax(e1, e2))
    eps = np.where((fpr == 0) & (fnr == 0), np.inf, eps)
    return np.where(((fpr == 0) ^ (fnr == 0)) | np.isnan(fpr) | np.isnan(fnr), np.nan, eps)


def example_epsilons(unlearned: Any, retrained: Any, delta: float = FQ_DELTA,
                     attacks: Sequence[str] = ("threshold",), chunk: int = 4096, seed: int = 0) -> np.ndarray:
    """eps of each forget example: max(0, max over the kept attacks), the list starting at the public
    code's `[0.]`, so an example whose attacks are all discarded gets 0 and eps is never negative."""
    u, r = _numpy(unlearned), _numpy(retrained)
    unknown = set(attacks) - set(ATTACKS)
    if unknown or not attacks:
        raise ValueError(f"unknown forgetting-quality attacks {sorted(unknown)}; use some of {', '.join(ATTACKS)}")
    out = []
    for a in range(0, u.shape[-1], chunk):  # bounded memory: [2 (N_u + N_r), chunk] per pass
        uc, rc = u[:, a:a + chunk], r[:, a:a + chunk]
        rates = []
        if "threshold" in attacks or "threshold_mirrored" in attacks:
            rates.append(threshold_attack_rates(uc, rc, mirrored="threshold_mirrored" in attacks))
        if "logistic" in attacks:
            rates.append(logistic_attack_rates(uc, rc, seed))
        eps = attack_epsilons(np.concatenate([f for f, _ in rates]), np.concatenate([n for _, n in rates]), delta)
        out.append(np.fmax(0.0, np.where(np.isnan(eps), -np.inf, eps).max(axis=0)))
    return np.concatenate(out) if out else np.zeros(0)


def epsilon_scores(eps: np.ndarray, bin_width: float = FQ_BIN_WIDTH, n_bins: int = FQ_N_BINS) -> np.ndarray:
    """Score h = 2 / 2**n of each eps, n = np.digitize(eps, arange(n_bins) * bin_width) as the public
    bin_index_fn (n = 1 for eps in [0, w), ..., n_bins for eps >= (n_bins - 1) w and for inf). eps is
    clipped at 0 first (the reference's recommendation), so h <= 1 even for an eps computed without the
    initial 0; h lies in [2**(1 - n_bins), 1]."""
    eps = np.maximum(np.asarray(eps, dtype=np.float64), 0.0)
    return 2.0 / 2.0 ** np.digitize(eps, np.arange(n_bins) * bin_width)


def forgetting_quality(unlearned_outputs: Any, retrained_outputs: Any, y: Any = None,
                       delta: float = FQ_DELTA, bin_width: float = FQ_BIN_WIDTH,
                       n_bins: int = FQ_N_BINS, scalar: str = "ce_argmax",
                       attacks: Sequence[str] = ("threshold",)) -> float:
    """Forgetting quality F of the NeurIPS 2023 unlearning challenge (SPEC section 7, SEED_METHODS 6.2).

    `unlearned_outputs` [N_u, M] and `retrained_outputs` [N_r, M] hold a scalar per model (N unlearned
    and N retrained models from different seeds) and forget example. Logits [N, M, C] are reduced to
    `output_scalar(..., scalar)` (labels `y` [M] needed except for the label-free `ce_argmax`). Per
    example, the `attacks` give FPR/FNR pairs (`threshold`: the public best_threshold_attack, every
    observed value as a threshold; `threshold_mirrored`: those and their opposites; `logistic`: the
    public 3-fold logistic-regression attack); eps = max(0, max over attacks), each attack's eps from
    `attack_epsilons`; h = 2 / 2**bin(eps) (`epsilon_scores`); F = mean of h over examples, in
    [2**(1 - n_bins), 1]. Defaults are the public code's: delta 0.01, bin width 0.5, 13 bins, the
    threshold attack, f = ce_argmax. With few models (N ~ 10) chance alone gives eps of 1-2 even for
    identical distributions.
    """
    u, r = _numpy(unlearned_outputs), _numpy(retrained_outputs)
    if u.ndim == 3 or r.ndim == 3:
        if y is None and scalar != "ce_argmax":
            raise ValueError(f"logit outputs [N, M, C] need the labels y of the forget examples for scalar {scalar!r}")
        u, r = output_scalar(u, y, scalar), output_scalar(r, y, scalar)
    if u.shape[-1] == 0:
        return float("nan")
    return float(epsilon_scores(example_epsilons(u, r, delta, attacks), bin_width, n_bins).mean())


def challenge_score(f: float, ra_u: float, ra_r: float, ta_u: float, ta_r: float) -> float:
    """The challenge's final score F * (RA_u / RA_r) * (TA_u / TA_r), ratios not clipped (NaN if a
    reference accuracy is 0)."""
    if ra_r == 0 or ta_r == 0:
        return float("nan")
    return float(f * (ra_u / ra_r) * (ta_u / ta_r))


# --------------------------------------------------------------------------------------------------
# 004's F-score variant (reproduction only; SEED_METHODS 6.3)
# --------------------------------------------------------------------------------------------------

F004_DELTA = 0.1
F004_THRESHOLDS = np.arange(1, 10) / 10.0   # fixed thresholds 0.1 ... 0.9 on the class-0 probability


def _gaussian_attack_004(p_r: np.ndarray, p_u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """004's GaussianAttack on every example at once; p_r [N_r, M], p_u [N_u, M] (labels: retrain 1,
    unlearned 0, as in its code). A Gaussian (np.std, ddof 0) is fit to each group; t0 <= t1 are the
    points where the two densities are equal; its code compares the group-0 (unlearned) density with
    the group-1 density at t0 + 0.01 and predicts "retrain" for x <= t1 if the former is larger, else for
    t0 <= x <= t1; rates are measured on the samples it was fit on. Returns (fpr, fnr) [1, M] in its
    labelling; NaN (the attack discarded) where its code would fail: equal or zero spreads (no two
    crossing points)."""
    m0, s0 = p_u.mean(axis=0), p_u.std(axis=0)
    m1, s1 = p_r.mean(axis=0), p_r.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = 1 / (2 * s0 ** 2) - 1 / (2 * s1 ** 2)
        b = m1 / s1 ** 2 - m0 / s0 ** 2
        c = m0 ** 2 / (2 * s0 ** 2) - m1 ** 2 / (2 * s1 ** 2) - np.log(s1 / s0)
        root = np.sqrt(b ** 2 - 4 * a * c)
        lo, hi = (-b - root) / (2 * a), (-b + root) / (2 * a)
        t0, t1 = np.minimum(lo, hi), np.maximum(lo, hi)
        x = t0 + 0.01
        dens0 = np.exp(-0.5 * ((x - m0) / s0) ** 2) / (s0 * np.sqrt(2 * np.pi))
        dens1 = np.exp(-0.5 * ((x - m1) / s1) ** 2) / (s1 * np.sqrt(2 * np.pi))
    ok = (s0 > 0) & (s1 > 0) & (a != 0) & np.isfinite(t0) & np.isfinite(t1)
    below = dens0 > dens1

    def predict_retrain(p: np.ndarray) -> np.ndarray:
        return np.where(below, p <= t1, (p >= t0) & (p <= t1))

    fpr = predict_retrain(p_u).mean(axis=0)
    fnr = 1.0 - predict_retrain(p_r).mean(axis=0)
    return np.where(ok, fpr, np.nan)[None], np.where(ok, fnr, np.nan)[None]


def f_score_004(unlearned_logits: Any, retrained_logits: Any, delta: float = F004_DELTA) -> float:
    """004's F-score (`UnlearningScore.H_score`), for reproduction only: per forget example, the softmax
    probability of class 0 of each model; 9 threshold attacks ("retrain" if p > 0.1, ..., 0.9) and the
    Gaussian attack give (FPR, FNR); per attack eps = inf if both are 0, discarded if one is 0, else
    eps1 = log(1-delta-FPR) - log(FNR) and eps2 = log(1-delta-FNR) - log(FPR) combined by Python's
    max(eps1, eps2), which is NaN (discarded) whenever eps1 is NaN; eps = the max over kept attacks, -inf
    if none; h = 2 / 2**(12 sigmoid(eps) + 1); F = mean h. Logits are [N, M, C]; delta 0.1."""
    from scipy.special import expit

    pu = np.exp(_log_softmax(unlearned_logits))[..., 0]    # [N_u, M]
    pr = np.exp(_log_softmax(retrained_logits))[..., 0]
    if pu.shape[-1] == 0:
        return float("nan")
    t = F004_THRESHOLDS[:, None, None]
    fpr = [(pu[None] > t).mean(axis=1)]                     # unlearned (label 0) predicted retrain
    fnr = [1.0 - (pr[None] > t).mean(axis=1)]               # retrained (label 1) predicted unlearned
    g_fpr, g_fnr = _gaussian_attack_004(pr, pu)
    fpr, fnr = np.concatenate(fpr + [g_fpr]), np.concatenate(fnr + [g_fnr])
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(1 - delta - fpr) - np.log(fnr)
        e2 = np.log(1 - delta - fnr) - np.log(fpr)
    eps = np.where(np.isnan(e1), np.nan, np.where(e2 > e1, e2, e1))
    eps = np.where((fpr == 0) & (fnr == 0), np.inf, eps)
    eps = np.where(((fpr == 0) ^ (fnr == 0)) | np.isnan(fpr) | np.isnan(fnr), np.nan, eps)
    best = np.where(np.isnan(eps), -np.inf, eps).max(axis=0)
    return float((2.0 / 2.0 ** (12.0 * expit(best) + 1.0)).mean())
