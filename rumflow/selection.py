"""Hyperparameter selection: the select config, the trials of a grid, the validation requests, and the
pure rule that picks settings from the trials' figures (the flow is flows/select.py; no Prefect here).

Honesty: trials are scored on validation requests, drawn by the same proxy from the pool left after the
K requests the experiment reports (plan steps K+1..K+V) and applied to the original model as one-step
requests (their own retrain reference: D_train minus that request). No trial forgets, or leaves out of
its retain set, an example of a reported request; the report is the experiment run on those requests.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_origin

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from rumflow.config import ExperimentConfig, MethodSpec, Strict, apply_override, validate_config
from rumflow.errors import ConfigError
from rumflow.planning import TIERS, StepPlan, plan_step

TARGETS = ("rum.low", "rum.mid", "rum.high", "vanilla")


class RuleConfig(Strict):
    max_rte: float = Field(0.05, gt=0, description="cost cap: the step's RTE (unlearning seconds over the "
                           "validation retrain's seconds; the worst validation request counts) at most this")
    objective: Literal["mean_tow_towmia", "min_tow_towmia"] = Field(
        "mean_tow_towmia", description="what is maximised under the cap: the mean or the minimum of ToW and "
        "ToW-MIA (each averaged over the validation requests)")
    tolerance: float = Field(0.0, ge=0, description="objectives within this of the best count as tied; among "
                             "tied trials the cheaper wins (lower RTE, then fewer examples processed)")


class ValidationConfig(Strict):
    requests: int = Field(1, ge=1, description="V validation requests per seed and proxy (plan steps K+1..K+V "
                          "of the proxy, each applied to the original model)")
    seeds: list[int] | None = Field(None, min_length=1, description="seeds whose original models score the "
                                    "trials (default: the base's first seed)")
    proxies: list[str] | None = Field(None, min_length=1, description="proxies that draw the validation "
                                      "requests (default: all of the base's proxies)")


class SelectConfig(Strict):
    base: ExperimentConfig = Field(description="the experiment whose settings are selected (a mapping, or "
                                   "base_config: path in the YAML)")
    space: dict[Literal["rum.low", "rum.mid", "rum.high", "vanilla"], list[dict[str, Any]]] = Field(
        description="per target, candidate method entries; a hyperparameter given as a list is a grid axis")
    sampler: Literal["grid"] = Field("grid", description="grid: every combination of the space")
    max_trials: int = Field(64, ge=1, description="refuse a grid larger than this (a guard against typos)")
    rule: RuleConfig = Field(default_factory=RuleConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler(cls, v: Any) -> Any:
        if v == "optuna":
            raise ValueError("sampler 'optuna' is not available in this version (optuna is not installed here); "
                             "use sampler: grid")
        return v

    @field_validator("space")
    @classmethod
    def _candidates_valid(cls, v: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        if not v:
            raise ValueError("the space is empty; give candidates for rum.low, rum.mid, rum.high or vanilla")
        for target, entries in v.items():
            if not entries:
                raise ValueError(f"space {target} has no candidates; list at least one method entry")
            for entry in entries:
                expand_entry(entry, target)  # raises with one sentence on a bad entry
        return v

    @model_validator(mode="after")
    def _fits(self) -> "SelectConfig":
        if len(rum_trials(self)) + len(vanilla_trials(self)) > self.max_trials:
            raise ValueError(f"the grid has {len(rum_trials(self)) + len(vanilla_trials(self))} trials, more "
                             f"than max_trials={self.max_trials}; narrow the space or raise max_trials")
        b = self.base
        if b.recompute:
            raise ValueError("selection needs requests fixed before any setting is chosen, but the base "
                             f"recomputes {', '.join(b.recompute)} on the RUM model; remove recompute")
        for p in self.validation.proxies or []:
            if p not in b.proxies:
                raise ValueError(f"validation.proxies lists '{p}', which is not among the base's proxies")
        return self

    @property
    def seeds(self) -> list[int]:
        return self.validation.seeds or self.base.seeds[:1]

    @property
    def proxies(self) -> list[str]:
        return self.validation.proxies or self.base.proxies

    @property
    def folder(self) -> str:
        return f"{self.base.name}-select"

    def digest(self) -> str:
        """sha256 of everything that decides the numbers (the base's runner excepted)."""
        body = self.model_dump(mode="json", exclude={"base"})
        body["base"] = self.base.digest()
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- the grid

def _list_typed(method: str, key: str) -> bool:
    """The hyperparameter itself takes a list (so a grid over it is a list of lists)."""
    from rumflow.methods.registry import get_method

    field = get_method(method).params.model_fields.get(key)
    return field is not None and get_origin(field.annotation) in (list, tuple)


def expand_entry(entry: dict[str, Any], target: str = "candidate") -> list[MethodSpec]:
    """Every MethodSpec of one candidate entry: the product of its list-valued hyperparameters."""
    if not isinstance(entry, dict) or "method" not in entry:
        raise ValueError(f"{target}: each candidate is a mapping with a 'method' key, e.g. "
                         "{method: finetune, lr: [0.01, 0.1]}")
    method = entry["method"]
    if not isinstance(method, str):
        raise ValueError(f"{target}: 'method' names one method (list other methods as other entries)")
    flat = {k: v for k, v in entry.items() if k != "method"}
    flat = {**(flat.pop("params", None) or {}), **flat}
    axes = {}
    for key, value in flat.items():
        grid = isinstance(value, list) and (not _list_typed(method, key) or
                                            all(isinstance(x, list) for x in value))
        if grid and not value:
            raise ValueError(f"{target}: {method}.{key} is an empty list; give at least one value")
        axes[key] = value if grid else [value]
    specs = []
    for combo in itertools.product(*axes.values()):
        try:
            specs.append(MethodSpec.model_validate({"method": method, **dict(zip(axes, combo))}))
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"{target}: {msg}") from None
    return specs


def candidates(cfg: SelectConfig, target: str) -> list[MethodSpec]:
    """The candidates of one target, or the base's setting when the space leaves it out."""
    if target in cfg.space:
        return [s for entry in cfg.space[target] for s in expand_entry(entry, target)]
    stage = target.split(".")[-1]
    return [getattr(cfg.base.rum, stage) if target.startswith("rum.") else cfg.base.vanilla]


@dataclass(frozen=True)
class Trial:
    """One point of the grid: RUM's three tiers, or vanilla's one method (stage 'mix')."""

    strategy: str
    index: int
    specs: tuple[tuple[str, MethodSpec], ...]

    @property
    def name(self) -> str:
        return f"{self.strategy}-{self.index}"

    @property
    def label(self) -> str:
        """Which methods, e.g. 'none/finetune/neggrad_plus' (RUM's low/mid/high) or 'neggrad_plus'."""
        return "/".join(spec.method for _, spec in self.specs)

    def settings(self) -> dict[str, dict[str, Any]]:
        """Per stage: {method, **hyperparameters}, as a config entry."""
        return {stage: {"method": spec.method, **spec.params.model_dump(mode="json")} for stage, spec in self.specs}


def rum_trials(cfg: SelectConfig) -> list[Trial]:
    """Every combination of the tiers' candidates (none when the space searches no RUM tier)."""
    if not any(t.startswith("rum.") for t in cfg.space):
        return []
    grid = itertools.product(*(candidates(cfg, f"rum.{stage}") for stage in TIERS))
    return [Trial("rum", i, tuple(zip(TIERS, specs))) for i, specs in enumerate(grid)]


def vanilla_trials(cfg: SelectConfig) -> list[Trial]:
    """Every vanilla candidate (none when the space does not search vanilla)."""
    if "vanilla" not in cfg.space:
        return []
    return [Trial("vanilla", i, (("mix", spec),)) for i, spec in enumerate(candidates(cfg, "vanilla"))]


def short(spec: MethodSpec) -> str:
    """method(k=v, ...) with only the hyperparameters that differ from the method's defaults."""
    from rumflow.methods.registry import get_method

    defaults = get_method(spec.method).params().model_dump(mode="json")
    mine = spec.params.model_dump(mode="json")
    changed = ", ".join(f"{k}={v}" for k, v in mine.items() if defaults.get(k) != v)
    return f"{spec.method}({changed})" if changed else spec.method


# ------------------------------------------------------------------------------------------- requests

def validation_plan(plan: StepPlan) -> StepPlan:
    """Plan step K+v as a one-step request on the original model: its tiers, nothing forgotten before."""
    return StepPlan(step=plan.step, low=plan.low, mid=plan.mid, high=plan.high, before=[])


def request_plans(ids: np.ndarray, memorization: np.ndarray, steps: int, requests: int, per_tier: int,
                  mid_target: str = "median") -> tuple[list[StepPlan], list[StepPlan]]:
    """(the K reported plans, the V validation plans) of one proxy's scores, by the experiment's plan_step."""
    plans: list[StepPlan] = []
    for k in range(1, steps + requests + 1):
        plans.append(plan_step(k, ids, memorization, plans[-1].forgotten if plans else [], per_tier, mid_target))
    return plans[:steps], [validation_plan(p) for p in plans[steps:]]


# ------------------------------------------------------------------------------------------- the rule

def objective(tow: Any, tow_mia: Any, kind: str) -> np.ndarray:
    """The rule's objective from ToW and ToW-MIA (NaN where either is unknown)."""
    a, b = np.asarray(tow, dtype=np.float64), np.asarray(tow_mia, dtype=np.float64)
    return (a + b) / 2 if kind == "mean_tow_towmia" else np.minimum(a, b)


def summarize_trials(units: pd.DataFrame) -> pd.DataFrame:
    """One row per trial from its per-request rows: means of the figures, the worst request's RTE, and
    the error of a trial that failed on any request (its figures are then NaN)."""
    keys = ["trial", "strategy", "index", "label"]
    g = units.groupby(keys, sort=False)
    out = g.agg(tow=("tow", "mean"), tow_mia=("tow_mia", "mean"), rte_step=("rte_step", "mean"),
                rte_step_max=("rte_step", "max"), seconds=("seconds_step", "mean"),
                retrain_seconds=("retrain_seconds", "mean"), examples=("examples", "mean"),
                requests=("tow", "size")).reset_index()
    errors = g["error"].agg(lambda e: next((x for x in e if isinstance(x, str) and x), None)).to_numpy()
    out["error"] = errors
    failed = out["error"].notna().to_numpy()
    out.loc[failed, ["tow", "tow_mia", "rte_step", "rte_step_max"]] = np.nan
    return out


def apply_rule(sweep: pd.DataFrame, rule: RuleConfig) -> pd.DataFrame:
    """Add objective, meets_cap and selected: per strategy, under rte_step_max <= max_rte, the best
    objective; within `tolerance` of it the cheaper (lower rte_step, then fewer examples, then the
    earlier trial). A strategy with no trial under the cap selects nothing."""
    out = sweep.copy()
    out["objective"] = objective(out["tow"], out["tow_mia"], rule.objective)
    cost = out["rte_step_max"].to_numpy(dtype=np.float64)
    out["meets_cap"] = (cost <= rule.max_rte) & np.isfinite(out["objective"].to_numpy(dtype=np.float64))
    out["selected"] = False
    for _, group in out[out["meets_cap"]].groupby("strategy", sort=False):
        best = group["objective"].max()
        tied = group[group["objective"] >= best - rule.tolerance - 1e-12]
        pick = tied.sort_values(["rte_step", "examples", "index"], kind="stable").index[0]
        out.loc[pick, "selected"] = True
    return out


def strategies_without_pick(sweep: pd.DataFrame) -> list[str]:
    """Strategies searched whose trials all miss the cap (or failed)."""
    return [s for s in dict.fromkeys(sweep["strategy"]) if not sweep.loc[sweep["strategy"] == s, "selected"].any()]


def selected_config(cfg: SelectConfig, sweep: pd.DataFrame, trials: list[Trial]) -> ExperimentConfig:
    """The base experiment with the selected RUM tiers and vanilla method (the base's where not searched)."""
    data = cfg.base.model_dump(mode="json")
    by_name = {t.name: t for t in trials}
    for name in sweep.loc[sweep["selected"], "trial"]:
        trial = by_name[name]
        for stage, entry in trial.settings().items():
            if stage == "mix":
                data["vanilla"] = entry
            else:
                data["rum"][stage] = entry
    return validate_config(data)


# ------------------------------------------------------------------------------------------- loading

def _explain(exc: ValidationError) -> str:
    """One sentence for the first problem of a select config."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        owner: Any = SelectConfig
        for part in loc[:-1]:
            ann = getattr(owner.model_fields.get(part), "annotation", None)
            owner = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if owner is None:
                break
        valid = f"; valid keys there: {', '.join(owner.model_fields)}" if owner else ""
        return f"unknown select config key '{key}'{valid}."
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("value_error", "assertion_error"):
        return f"select config {key}: {msg}." if key != "(top level)" else f"select config: {msg}."
    return f"select config {key}: {msg.lower()} (got {err.get('input')!r}); fix it in the file or with --set."


def _read_yaml(p: Path, what: str) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"{what} '{p}' does not exist or is not a file; check the path.")
    try:
        loaded = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} '{p}' cannot be read as YAML ({type(exc).__name__}); fix it.") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{what} '{p}' must hold a mapping of keys to values at the top level.")
    return loaded or {}


def load_select_config(path: str | Path | dict[str, Any], overrides: list[str] | None = None) -> SelectConfig:
    """Read a select config (YAML path or mapping), resolve `base_config`, apply `--set` overrides (the
    base's keys as base.<key>), validate; ConfigError with one sentence on any problem."""
    if isinstance(path, dict):
        data, here = copy.deepcopy(path), Path.cwd()
    else:
        data, here = _read_yaml(Path(path), "select config file"), Path(path).parent
    if "base_config" in data:
        if "base" in data:
            raise ConfigError("the select config gives both base and base_config; keep one.")
        ref = Path(data.pop("base_config"))
        data["base"] = _read_yaml(ref if ref.is_absolute() else here / ref, "base_config")
    if not isinstance(data.get("base", {}), dict):
        raise ConfigError("select config base must be a mapping (an experiment config); or use base_config: path.")
    data.setdefault("base", {})
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        data["base"] = validate_config(data["base"])  # the experiment's own one-sentence errors
    except ConfigError as exc:
        raise ConfigError(f"select config base: {exc}") from None
    try:
        return SelectConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def frontier_markdown(sweep: pd.DataFrame, rows: int | None = None) -> str:
    """The frontier table: per strategy, trials under the cap first, best objective first."""
    order = sweep.sort_values(["strategy", "meets_cap", "objective", "rte_step"],
                              ascending=[True, False, False, True], kind="stable")
    if rows is not None:
        order = order.groupby("strategy", sort=False).head(rows)
    head = "| strategy | trial | settings | ToW | ToW-MIA | objective | RTE step | examples | cap | selected |"
    lines = [head, "|" + "---|" * 10]

    def f(x: Any) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    for r in order.itertuples():
        lines.append(f"| {r.strategy} | {r.trial} | {r.settings} | {f(r.tow)} | {f(r.tow_mia)} | {f(r.objective)} "
                     f"| {f(r.rte_step_max)} | {int(r.examples) if r.examples == r.examples else 'n/a'} | "
                     f"{'yes' if r.meets_cap else 'no'} | {'**yes**' if r.selected else ''} |")
    return "\n".join(lines)
