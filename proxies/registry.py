"""What each memorization proxy is: where it comes from and which way is 'more memorized'."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rumflow.registry import Registry


@dataclass(frozen=True)
class Proxy:
    """A proxy's identity: `memorization = direction * score` (higher = more memorized)."""

    name: str
    direction: int
    source: str  # "learning_events" | "holdout" | "memorization"
    mid_target: str = "median"  # the mid tier is closest to the pool's median, or to 0.5
    recomputable: bool = False  # can be recomputed on the current model at every step
    summary: str = ""


PROXIES: Registry[Proxy] = Registry("proxy")
for _p in [
    Proxy("confidence", -1, "learning_events", summary="mean over epochs of p[y] (train forward pass)"),
    Proxy("max_confidence", -1, "learning_events", summary="mean over epochs of max_c p[c]"),
    Proxy("entropy", -1, "learning_events", summary="mean over epochs of sum_c p[c] log p[c] (negative entropy)"),
    Proxy("binary_accuracy", -1, "learning_events", summary="mean over epochs of 1[argmax p = y]"),
    Proxy("holdout_retraining", +1, "holdout", recomputable=True,
          summary="symmetric KL between the model and a copy fine-tuned on a held-out split"),
    Proxy("memorization", +1, "memorization", mid_target="half",
          summary="Feldman & Zhang subsampling estimate of true memorization"),
]:
    PROXIES.add(_p.name, _p)


def memorization_of(name: str, scores: np.ndarray) -> np.ndarray:
    """Orient raw proxy scores so that higher always means more memorized."""
    return PROXIES[name].direction * np.asarray(scores, dtype=np.float64)
