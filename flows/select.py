"""The selection flow: score every trial of a grid on validation requests, pick settings by the rule.

Per validation seed: the original model and the proxies' scores (the experiment's own cached tasks, so
the same models and requests as `rumflow run`), the K reported plans, then V more plans of the same
proxy (the validation requests). Each validation request is applied to the original model with its
own retrain reference; each trial is a chain of cached unlearning tasks (RUM: its three tiers; vanilla:
one method), submitted to the configured task runner, evaluated against that reference. Trials that
share their first tiers share those tasks. Outputs in `<out>/<base name>-select/`: sweep.parquet,
trials.parquet (one row per trial and request), requests.parquet, figures/frontier.png, selected.yaml,
summary.md, config.yaml and the manifest.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed

from rumflow.artifacts import runfolder
from rumflow.artifacts.plots import plot_frontier
from rumflow.artifacts.tables import write_parquet, write_text
from rumflow.config import dump_config
from rumflow.errors import ConfigError
from rumflow.flows.experiment import Submitter, api_for_workers, unlearn_seed
from rumflow.flows.runners import task_runner, torch_threads_per_worker
from rumflow.metrics import tow, tow_mia
from rumflow.planning import TIERS, StepPlan
from rumflow.proxies.registry import PROXIES
from rumflow.runtime import check_feasible
from rumflow.selection import (SelectConfig, Trial, apply_rule, frontier_markdown, rum_trials, selected_config,
                               short, strategies_without_pick, summarize_trials, validation_plan, vanilla_trials)

SELECTED = "selected.yaml"


def check_select_feasible(cfg: SelectConfig) -> None:
    """The base is feasible and its K reported steps plus V validation requests fit the training set."""
    ds = check_feasible(cfg.base)
    f, v = cfg.base.forget, cfg.validation.requests
    need = (f.steps + v) * 3 * f.per_tier
    if need >= len(ds.train):
        raise ConfigError(f"the {f.steps} reported steps and {v} validation requests need {need} of the "
                          f"{len(ds.train)} training examples with a retain set left; lower validation.requests, "
                          "forget.steps or forget.per_tier.")


@flow(name="rumflow-select", log_prints=False)
def select(config: SelectConfig, out: str = "runs") -> str:
    """Run the selection of `config` under `<out>/<base name>-select/` and return that folder."""
    run_dir = Path(out).expanduser().resolve() / config.folder
    check_select_feasible(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runfolder.hold(run_dir, config.digest(), config.folder), api_for_workers():
        runfolder.mark_incomplete(run_dir)
        return _select(config, run_dir)


def configured(cfg: SelectConfig):
    """The selection flow on the base's task runner, its workers' torch threads set."""
    os.environ["RUMFLOW_TORCH_THREADS"] = str(torch_threads_per_worker(cfg.base.runner, cfg.base.device))
    torch.set_num_threads(int(os.environ["RUMFLOW_TORCH_THREADS"]))
    return select.with_options(task_runner=task_runner(cfg.base))


def submit_requests(s: Submitter, cfg: SelectConfig) -> tuple[dict, dict]:
    """Per (seed, proxy): the original model's future, and the reported and validation plans (results)."""
    base, K, V = cfg.base, cfg.base.forget.steps, cfg.validation.requests
    truth = None
    if any(PROXIES[p].source == "memorization" for p in cfg.proxies):
        truth = s.submit("memorization", f"R{base.memorization.models}", data=base.data, model=base.model,
                         train=base.train, memorization=base.memorization, device=base.device, workdir=s.workdir)
    originals, futures = {}, {}
    for seed in cfg.seeds:
        originals[seed] = s.train(seed, None, f"s{seed}/original", events=True)
        for p in cfg.proxies:
            scores = truth if PROXIES[p].source == "memorization" else s.scores(
                p, seed, originals[seed], originals[seed], f"s{seed}/{p}")
            plan, chain = None, []
            for k in range(1, K + V + 1):  # the experiment's plan tasks for 1..K, the same proxy beyond
                plan = s.submit("plan", f"s{seed}/{p}/{'step' if k <= K else 'val'}{k}",
                                step=k, proxy=p, scores=scores, previous=plan, per_tier=base.forget.per_tier,
                                data=base.data, device=base.device, workdir=s.workdir)
                chain.append(plan)
            futures[(seed, p)] = chain
    plans = {key: [f.result() for f in chain] for key, chain in futures.items()}
    reported = {key: chain[:K] for key, chain in plans.items()}
    validation = {key: [validation_plan(pl) for pl in chain[K:]] for key, chain in plans.items()}
    return originals, {"reported": reported, "validation": validation}


def submit_trials(s: Submitter, cfg: SelectConfig, trials: list[Trial], originals: dict,
                  validation: dict[tuple[int, str], list[StepPlan]]) -> list[dict[str, Any]]:
    """Every trial on every validation request; trials sharing their first tiers share those tasks."""
    units, shared = [], {}
    for (seed, p), plans in validation.items():
        for v, plan in enumerate(plans, start=1):
            where = f"s{seed}/{p}/val{v}"
            retrain = s.train(seed, plan, f"{where}/retrain")
            reference = s.evaluate(retrain, plan, seed, f"{where}/retrain")
            for trial in trials:
                model, chain = originals[seed], []
                for depth, (stage, spec) in enumerate(trial.specs, start=1):
                    key = (seed, p, v, trial.strategy, trial.specs[:depth])
                    if key not in shared:
                        prefix = "-".join(short(sp) for _, sp in trial.specs[:depth])
                        label = f"{where}/{trial.strategy}-{stage}/{prefix}"
                        shared[key] = s.unlearn(model, plan, stage, spec, unlearn_seed(seed, plan.step, stage), label)
                    model = shared[key]
                    chain.append((stage, model))
                last = "-".join(short(sp) for _, sp in trial.specs)
                metrics = s.evaluate(model, plan, seed, f"{where}/{trial.strategy}/{last}")
                units.append({"trial": trial, "seed": seed, "proxy": p, "request": v, "plan": plan,
                              "chain": chain, "metrics": metrics, "retrain": retrain, "reference": reference})
    return units


def _error(future: PrefectFuture) -> str | None:
    """None when the task completed, else its error in one line."""
    try:
        future.result()
        return None
    except Exception as exc:  # a trial that diverged is a finding, not the end of the selection
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{type(exc).__name__}: {text}"


def unit_row(u: dict[str, Any]) -> dict[str, Any]:
    """One trials.parquet row: a trial on one validation request, against its retrain reference."""
    trial: Trial = u["trial"]
    ref, ret = u["reference"].result(), u["retrain"].result()  # a failed reference ends the selection
    row: dict[str, Any] = {"trial": trial.name, "strategy": trial.strategy, "index": trial.index,
                           "label": trial.label, "seed": u["seed"], "proxy": u["proxy"], "request": u["request"],
                           "step": u["plan"].step, "retrain_seconds": ret.seconds}
    error = next((e for e in (_error(f) for _, f in u["chain"]) if e), None) or _error(u["metrics"])
    seconds = examples = 0.0
    for stage, f in u["chain"]:
        done = None if error else f.result()
        row[f"{stage}_seconds"] = done.seconds if done else float("nan")
        row[f"{stage}_examples"] = done.examples if done else 0
        seconds += row[f"{stage}_seconds"]
        examples += row[f"{stage}_examples"]
    row.update(seconds_step=seconds, examples=int(examples), error=error,
               rte_step=seconds / ret.seconds if ret.seconds > 0 else float("nan"))
    m = u["metrics"].result() if not error else {}
    for key in ("acc_forget", "acc_retain", "acc_test", "mia"):
        row[key] = float(m.get(key, float("nan")))
        row[f"retrain_{key}"] = float(ref.get(key, float("nan")))
    row["tow"] = float(tow(row["acc_forget"], row["acc_retain"], row["acc_test"], row["retrain_acc_forget"],
                           row["retrain_acc_retain"], row["retrain_acc_test"]))
    row["tow_mia"] = float(tow_mia(row["mia"], row["acc_retain"], row["acc_test"], row["retrain_mia"],
                                   row["retrain_acc_retain"], row["retrain_acc_test"]))
    return row


def sweep_table(cfg: SelectConfig, units: pd.DataFrame, trials: list[Trial]) -> pd.DataFrame:
    """sweep.parquet: one row per trial, its settings as JSON and flat columns, the rule applied."""
    sweep = summarize_trials(units)
    by_name = {t.name: t for t in trials}
    sweep["settings"] = [" | ".join(f"{st}: {short(sp)}" for st, sp in by_name[n].specs) for n in sweep["trial"]]
    sweep["settings_json"] = [json.dumps(by_name[n].settings(), sort_keys=True) for n in sweep["trial"]]
    for stage in (*TIERS, "mix"):
        sweep[f"{stage}_method"] = [dict(by_name[n].specs).get(stage).method if stage in dict(by_name[n].specs)
                                    else None for n in sweep["trial"]]
        sweep[f"{stage}_params"] = [json.dumps(dict(by_name[n].specs)[stage].params.model_dump(mode="json"),
                                               sort_keys=True) if stage in dict(by_name[n].specs) else None
                                    for n in sweep["trial"]]
    return apply_rule(sweep, cfg.rule)


def requests_table(plans: dict[str, dict[tuple[int, str], list[StepPlan]]]) -> pd.DataFrame:
    """requests.parquet: every example of every reported and validation request, with its tier."""
    rows = [{"seed": seed, "proxy": p, "role": role, "step": plan.step, "tier": tier, "example_id": i}
            for role, by in plans.items() for (seed, p), chain in by.items() for plan in chain
            for tier in TIERS for i in plan.tier(tier)]
    return pd.DataFrame(rows)


def summary(cfg: SelectConfig, sweep: pd.DataFrame, missing: list[str], wrote: bool) -> str:
    """summary.md: the rule, the outcome, the frontier table."""
    K, V = cfg.base.forget.steps, cfg.validation.requests
    lines = [f"# Selection for {cfg.base.name}", "",
             f"Rule: per strategy, the best {cfg.rule.objective} with RTE of the step <= {cfg.rule.max_rte:g} "
             f"(the worst validation request counts; ties within {cfg.rule.tolerance:g}: the cheaper).",
             f"Scored on {V} validation request(s) per seed {cfg.seeds} and proxy {cfg.proxies}: plan steps "
             f"{K + 1}..{K + V} of the proxy, applied to the original model, disjoint from the {K} reported "
             "requests (requests.parquet). The report is the experiment on the reported requests: "
             f"`rumflow run --config {SELECTED}`.", ""]
    for strategy in missing:
        lines.append(f"No {strategy} trial meets the cap RTE <= {cfg.rule.max_rte:g}, so none is selected.")
    if not wrote:
        lines += ["", f"{SELECTED} was not written (a searched strategy has no setting under the cap)."]
    for r in sweep[sweep["selected"]].itertuples():
        lines.append(f"Selected {r.strategy}: {r.settings} (ToW {r.tow:.3f}, ToW-MIA {r.tow_mia:.3f}, "
                     f"RTE {r.rte_step_max:.3f}).")
    failed = sweep[sweep["error"].notna()]
    for r in failed.itertuples():
        lines.append(f"Trial {r.trial} failed: {r.error}")
    lines += ["", "## Frontier", "", frontier_markdown(sweep), ""]
    return "\n".join(lines)


def _select(cfg: SelectConfig, run_dir: Path) -> str:
    """The body of the selection flow (in its run context)."""
    log = get_run_logger()
    s = Submitter(cfg.base, run_dir)
    trials = rum_trials(cfg) + vanilla_trials(cfg)
    originals, plans = submit_requests(s, cfg)
    units = submit_trials(s, cfg, trials, originals, plans["validation"])
    done = 0
    for future in as_completed(list(s.futures)):
        done += 1
        if future.state.is_failed():
            log.warning(f"a task failed ({future.state.message}); its trial is recorded as failed")
    log.info(f"{done} tasks done: {len(trials)} trials x {len(units) // max(len(trials), 1)} validation requests")
    table = pd.DataFrame([unit_row(u) for u in units])
    sweep = sweep_table(cfg, table, trials)
    missing = strategies_without_pick(sweep)
    outputs = [write_parquet(table, run_dir / "trials.parquet"), write_parquet(sweep, run_dir / "sweep.parquet"),
               write_parquet(requests_table(plans), run_dir / "requests.parquet"),
               plot_frontier(sweep, run_dir / "figures" / "frontier.png", cfg.rule.max_rte)]
    selected = run_dir / SELECTED
    wrote = not missing
    if wrote:
        outputs.append(write_text(dump_config(selected_config(cfg, sweep, trials)), selected))
    else:
        selected.unlink(missing_ok=True)  # a stale choice from an earlier rule must not survive
        for strategy in missing:
            log.warning(f"no {strategy} trial meets the cap RTE <= {cfg.rule.max_rte:g}; nothing selected")
    outputs.append(write_text(summary(cfg, sweep, missing, wrote), run_dir / "summary.md"))
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    runfolder.finish(run_dir, config_yaml, outputs, cfg.digest())
    return str(run_dir)


__all__ = ["SELECTED", "check_select_feasible", "configured", "select"]
