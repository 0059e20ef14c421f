"""Rows of the run's tables, built by plain functions with keyword arguments (the flow only orchestrates)."""
from __future__ import annotations

import json
import platform
from typing import Any

import numpy as np
import pandas as pd
import torch

import rumflow
from rumflow.config import ExperimentConfig, MethodSpec
from rumflow.metrics import add_derived_columns
from rumflow.planning import TIERS, StepPlan
from rumflow.training import resolve_device

STRATEGY_ORDER = ("original", "retrain", "rum", "vanilla")
STAGES = (*TIERS, "mix")


def provenance(cfg: ExperimentConfig) -> dict[str, Any]:
    """The columns every row of a run carries to say where it came from."""
    return {"run": cfg.name, "config_sha": cfg.digest(), "rumflow_version": rumflow.__version__,
            "torch_version": torch.__version__, "device": str(resolve_device(cfg.device)), "host": platform.node()}


def step_row(*, base: dict[str, Any], seed: int, proxy: str, strategy: str, step: int, stage: str, final: bool,
             spec: MethodSpec, checkpoint: str, seconds: float, seconds_step: float, retrain_seconds: float,
             plan: StepPlan, n_train: int, retain_policy: str, examples: int, code_sha: str,
             metrics: dict[str, Any]) -> dict[str, Any]:
    """One steps.parquet row: a model (`checkpoint`) evaluated against step `plan`'s sets."""
    return {**base, "seed": seed, "proxy": proxy, "strategy": strategy, "step": step, "stage": stage,
            "final": final, "method": spec.method,
            "params": json.dumps(spec.params.model_dump(mode="json"), sort_keys=True),
            "checkpoint": checkpoint, "seconds": seconds, "seconds_step": seconds_step,
            "retrain_seconds": retrain_seconds, "examples": examples, "n_forget": len(plan.mix),
            "n_retain": n_train - len(plan.forgotten), "retain_policy": retain_policy, "code_sha": code_sha,
            **metrics}


def steps_table(rows: list[dict[str, Any]], proxies: list[str]) -> pd.DataFrame:
    """steps.parquet: the rows in a fixed order, plus the columns derived from them (ToW, RTE, ...)."""
    df = pd.DataFrame(rows)
    order = [df["seed"], df["proxy"].map(proxies.index), df["step"],
             df["strategy"].map(STRATEGY_ORDER.index), df["stage"].map(STAGES.index)]
    df = df.iloc[np.lexsort(order[::-1])].reset_index(drop=True)
    return add_derived_columns(df)


def scores_block(seed: int, step: int, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One examples.parquet block: the given proxies' (example_id, score) frames at `step`."""
    block: pd.DataFrame | None = None
    for name, f in frames.items():
        part = f[["example_id", "score"]].rename(columns={"score": name})
        block = part if block is None else block.merge(part, on="example_id", how="outer")
    assert block is not None
    block.insert(0, "step", step)
    block.insert(0, "seed", seed)
    return block


def forgotten_marks(seed: int, proxy: str, plan: StepPlan) -> list[dict[str, Any]]:
    """Which examples step `plan` forgot, and in which tier, when `proxy` tiered the requests."""
    return [{"seed": seed, "proxy": proxy, "example_id": i, "step": plan.step, "tier": t}
            for t in TIERS for i in plan.tier(t)]


def examples_table(base: dict[str, Any], proxies: list[str], ids: np.ndarray, labels: np.ndarray,
                   blocks: list[pd.DataFrame], marks: list[dict[str, Any]]) -> pd.DataFrame:
    """examples.parquet: per seed and scoring step, every training example's label and proxy scores,
    and for each tiering proxy the step and tier at which the example was forgotten."""
    table = pd.concat(blocks, ignore_index=True).merge(pd.DataFrame({"example_id": ids, "label": labels}),
                                                       on="example_id", how="left")
    if marks:
        frame = pd.DataFrame(marks)
        for proxy in proxies:
            part = frame[frame["proxy"] == proxy].drop(columns="proxy")
            part = part.rename(columns={"step": f"forget_step_{proxy}", "tier": f"forget_tier_{proxy}"})
            table = table.merge(part, on=["seed", "example_id"], how="left")
    for col in [c for c in table.columns if c.startswith("forget_step_")]:
        table[col] = table[col].astype("Int64")
    front = ["seed", "step", "example_id", "label"]
    table = table[front + [c for c in table.columns if c not in front]]
    table.insert(0, "config_sha", base["config_sha"])
    table.insert(0, "run", base["run"])
    return table.sort_values(["seed", "step", "example_id"], ignore_index=True)


def proxies_table(base: dict[str, Any], per_tier: int, ids: np.ndarray, truth: pd.DataFrame | None,
                  scores: dict[int, dict[str, tuple[pd.DataFrame, float]]],
                  original_seconds: dict[int, float]) -> pd.DataFrame:
    """proxies.parquet: per seed and proxy, agreement with true memorization (when estimated) and cost."""
    from rumflow.proxies.quality import proxy_quality

    mem = None if truth is None else truth.set_index("example_id").loc[ids, "score"].to_numpy()
    frames = []
    for seed, by_proxy in scores.items():
        values = {p: f.set_index("example_id").loc[ids, "score"].to_numpy() for p, (f, _) in by_proxy.items()}
        seconds = {p: s for p, (_, s) in by_proxy.items()}
        table = proxy_quality(values, mem, per_tier, seconds, original_seconds[seed])
        table.insert(0, "seed", seed)
        frames.append(table)
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "config_sha", base["config_sha"])
    out.insert(0, "run", base["run"])
    return out


def forgetting_quality_row(*, base: dict[str, Any], seed: int, proxy: str, strategy: str, models: int,
                           result: dict[str, Any]) -> dict[str, Any]:
    """One forgetting_quality.parquet row."""
    return {"run": base["run"], "config_sha": base["config_sha"], "seed": seed, "proxy": proxy,
            "strategy": strategy, "step": 1, "models": models, **result}
