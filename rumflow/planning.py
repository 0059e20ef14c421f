"""Forget-set planning: memorization tiers per step and the retain set of every sub-step."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from rumflow.errors import ConfigError

TIERS = ("low", "mid", "high")  # the RUM sub-step order, in memorization terms


class StepPlan(BaseModel):
    """The tiers of one step (sorted example ids) and everything forgotten before it."""

    model_config = ConfigDict(frozen=True)
    step: int
    low: list[int]
    mid: list[int]
    high: list[int]
    before: list[int]  # ids forgotten in steps 1..step-1

    def tier(self, name: str) -> list[int]:
        """The ids of tier `name` ('mix' = the union of the three)."""
        return self.mix if name == "mix" else getattr(self, name)

    @property
    def mix(self) -> list[int]:
        return sorted(self.low + self.mid + self.high)

    @property
    def forgotten(self) -> list[int]:
        """Everything forgotten once this step is done."""
        return sorted(self.before + self.mix)

    def excluded_from_retain(self, stage: str, policy: str) -> list[int]:
        """Ids left out of the retain set when unlearning `stage` ('low'/'mid'/'high'/'mix')."""
        if stage == "mix" or policy == "strict":
            return self.forgotten
        upto = TIERS[: TIERS.index(stage) + 1]  # RUM's code: later tiers of the step are still retained
        return sorted(self.before + [i for t in upto for i in self.tier(t)])


def select_tiers(ids: np.ndarray, memorization: np.ndarray, n: int,
                 mid_target: str = "median") -> dict[str, list[int]]:
    """Disjoint tiers of `n` ids: high = most memorized, low = least, mid = closest to the pool's
    median (or to 0.5), taken in that order from what is left; ties broken by example id. Examples
    without a finite score (e.g. true memorization of an example no model held out) are never chosen."""
    ids = np.asarray(ids, dtype=np.int64)
    mem = np.asarray(memorization, dtype=np.float64)
    if ids.shape != mem.shape:
        raise ValueError("ids and memorization scores must have the same length")
    scored = np.isfinite(mem)
    ids, mem = ids[scored], mem[scored]
    if 3 * n > len(ids):
        raise ConfigError(f"a step needs 3 x {n} = {3 * n} examples but only {len(ids)} are left in the pool; "
                          "lower forget.per_tier or forget.steps.")
    order = np.lexsort((ids, mem))  # ascending memorization, then id
    high, low, rest = order[len(order) - n:], order[:n], order[n:len(order) - n]
    target = 0.5 if mid_target == "half" else float(np.median(mem))
    by_distance = rest[np.lexsort((ids[rest], np.abs(mem[rest] - target)))]
    mid = by_distance[:n]
    return {"low": sorted(ids[low].tolist()), "mid": sorted(ids[mid].tolist()),
            "high": sorted(ids[high].tolist())}


def plan_step(step: int, ids: np.ndarray, memorization: np.ndarray, before: list[int], n: int,
              mid_target: str = "median") -> StepPlan:
    """Plan step `step`: tiers chosen from the pool of ids not forgotten before it."""
    ids = np.asarray(ids, dtype=np.int64)
    pool = ~np.isin(ids, np.asarray(before, dtype=np.int64))
    tiers = select_tiers(ids[pool], np.asarray(memorization)[pool], n, mid_target)
    return StepPlan(step=step, before=sorted(before), **tiers)


def check_request(n_train: int, steps: int, per_tier: int) -> None:
    """Stop early when the forget request cannot fit the training set (a retain set must remain)."""
    need = steps * 3 * per_tier
    if need >= n_train:
        raise ConfigError(f"the forget request ({steps} steps x 3 tiers x {per_tier} = {need} examples) does not "
                          f"fit the {n_train} training examples with a retain set left; lower forget.per_tier "
                          "or forget.steps.")


def partition_request(request: list[int] | np.ndarray, ids: np.ndarray, memorization: np.ndarray,
                      cuts: tuple[float, float] = (1 / 3, 2 / 3)) -> dict[str, list[int]]:
    """Split a given request (example ids) into disjoint low/mid/high tiers by where each example's
    memorization falls in the pool's distribution: below the pool's `cuts[0]` quantile is low, at or
    above `cuts[1]` is high, the rest mid. The pool is `ids` (the examples the model still holds, the
    request included), scored by `memorization` (higher = more memorized). Quantiles of the pool, not of
    the request, so a request of one highly memorized example still lands in high. An example without
    a finite score goes to high (the cautious tier)."""
    ids = np.asarray(ids, dtype=np.int64)
    mem = np.asarray(memorization, dtype=np.float64)
    if ids.shape != mem.shape:
        raise ValueError("ids and memorization scores must have the same length")
    if not 0.0 <= cuts[0] <= cuts[1] <= 1.0:
        raise ValueError("tier cuts must be quantiles with 0 <= low cut <= high cut <= 1")
    req = np.unique(np.asarray(request, dtype=np.int64))
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], req).clip(max=max(len(ids) - 1, 0))
    if len(ids) == 0 or not np.array_equal(ids[order][pos], req):
        raise ValueError("some requested ids are not in the scored pool")
    score = mem[order][pos]
    finite = mem[np.isfinite(mem)]
    lo, hi = (np.quantile(finite, cuts) if len(finite) else (np.inf, np.inf))
    tier = np.where(~np.isfinite(score) | (score >= hi), 2, np.where(score < lo, 0, 1))
    return {name: req[tier == k].tolist() for k, name in enumerate(TIERS)}
