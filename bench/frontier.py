"""The ToW-versus-cost figure of the cost issue: select settings on validation requests, then report RUM,
vanilla and every single method at its best setting under the cap on the held-out requests.

    OMP_NUM_THREADS=1 python bench/frontier.py [--select configs/mnist-select.yaml] [--out runs]
                                               [--set KEY=VALUE ...]   (select-config overrides)

1. `rumflow select --config SELECT`: every trial scored on the validation request(s) (plan step K+1 of
   each proxy, applied to the original model), the rule applied per strategy (RUM, vanilla).
2. Per single method of the vanilla space, its best trial under the same rule (`rule.max_rte`, the
   objective, the tolerance): the method's "best setting under the cap". A method with no trial under
   the cap is reported as such (its cheapest trial is not run).
3. `rumflow run` of the base experiment (all its seeds and proxies, the K reported steps) with RUM's
   selected tiers and, in turn, each single method as the vanilla strategy. The runs share one run
   folder, so the originals, proxies, plans, retrain references and RUM's tiers are computed once
   (served Cached to the later runs); each run's steps.parquet is kept as `<out>/frontier/steps-<m>.parquet`.
4. The report (`<out>/frontier/report.md`, also printed): per strategy, the mean over seeds of ToW,
   ToW-MIA and the step's RTE (unlearning seconds over the retrain reference's, measured side by side in
   the same run) with 95% t-intervals over seeds, the worst (seed, proxy, step), and whether
   ToW >= 0.95 and ToW-MIA >= 0.95 hold at every step with RTE <= the cap; `frontier.parquet` holds the
   per-(strategy, proxy, step) figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

GOAL_TOW, GOAL_RTE = 0.95, 0.05


class RunFailed(Exception):
    """A rumflow command that exited with an error (its last error line is the message)."""


def run(cmd: list[str]) -> float:
    """Run a rumflow command (its output streamed, its error line kept); its wall seconds."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("rumflow: error:")]
        raise RunFailed(errors[-1] if errors else f"exited with {done.returncode}")
    return time.perf_counter() - start


def best_per_method(sweep: pd.DataFrame, rule: dict[str, Any]) -> dict[str, pd.Series | None]:
    """Per single method of the vanilla space: its best trial under the rule (None: none under the cap)."""
    from rumflow.selection import RuleConfig, apply_rule

    vanilla = sweep[sweep["strategy"] == "vanilla"]
    out: dict[str, pd.Series | None] = {}
    for method, group in vanilla.groupby("mix_method", sort=False):
        ruled = apply_rule(group.assign(strategy=method), RuleConfig(**rule))
        picked = ruled[ruled["selected"]]
        out[str(method)] = picked.iloc[0] if len(picked) else None
    return out


def interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def final_rows(steps: pd.DataFrame, strategy: str) -> pd.DataFrame:
    """A strategy's model at the end of each step (RUM: after its last tier)."""
    return steps[(steps["strategy"] == strategy) & steps["final"] & (steps["step"] > 0)]


def summarize(label: str, rows: pd.DataFrame, cap: float) -> dict[str, Any]:
    """The figures of one strategy over every (seed, proxy, step): means over seeds with 95% intervals."""
    per_seed = rows.groupby("seed").agg(tow=("tow", "mean"), tow_mia=("tow_mia", "mean"),
                                        rte_step=("rte_step", "mean"))
    out: dict[str, Any] = {"strategy": label, "rows": len(rows)}
    for col in ("tow", "tow_mia", "rte_step"):
        out[col], out[f"{col}_ci95"] = interval(per_seed[col].to_numpy())
    out["tow_min"], out["tow_mia_min"] = float(rows["tow"].min()), float(rows["tow_mia"].min())
    out["rte_step_max"] = float(rows["rte_step"].max())
    out["acc_forget"] = float(rows["acc_forget"].mean())
    out["meets_goal"] = bool(out["tow_min"] >= GOAL_TOW and out["tow_mia_min"] >= GOAL_TOW
                             and out["rte_step_max"] <= cap)
    return out


def markdown(table: pd.DataFrame) -> str:
    """The report table."""
    lines = ["| strategy | setting | ToW (95% CI over seeds) | min ToW | ToW-MIA (95% CI) | min ToW-MIA | "
             "RTE of a step (95% CI) | max RTE | every step >= 0.95 at RTE <= cap |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.strategy} | {r.setting} | {r.tow:.3f} ± {r.tow_ci95:.3f} | {r.tow_min:.3f} | "
                     f"{r.tow_mia:.3f} ± {r.tow_mia_ci95:.3f} | {r.tow_mia_min:.3f} | "
                     f"{r.rte_step:.4f} ± {r.rte_step_ci95:.4f} | {r.rte_step_max:.4f} | "
                     f"{'yes' if r.meets_goal else 'no'} |")
    return "\n".join(lines)


def plain_table(df: pd.DataFrame) -> str:
    """A markdown table of a frame (floats to 4 places), without optional dependencies."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--select", default="configs/mnist-select.yaml", help="the select config")
    ap.add_argument("--out", default="runs", help="parent of the run folders")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="select-config override")
    ap.add_argument("--report-only", action="store_true",
                    help="no runs: the report from the selection and the steps-<method>.parquet files kept")
    args = ap.parse_args()

    from rumflow.selection import load_select_config

    cfg = load_select_config(args.select, args.set)  # one sentence on a bad config, before any work
    out = Path(args.out).expanduser().resolve()
    rumflow = [sys.executable, "-m", "rumflow.cli"]
    sets = [x for s in args.set for x in ("--set", s)]
    seconds = {} if args.report_only else {
        "select": run(rumflow + ["select", "--config", args.select, "--out", str(out)] + sets)}
    sweep = pd.read_parquet(out / cfg.folder / "sweep.parquet")
    cap = cfg.rule.max_rte
    rum = sweep[(sweep["strategy"] == "rum") & sweep["selected"]]
    if rum.empty:
        raise SystemExit(f"no RUM trial meets the cap RTE <= {cap:g} on the validation request; see "
                         f"{out / cfg.folder / 'summary.md'} for the frontier measured")
    rum_settings = json.loads(rum.iloc[0]["settings_json"])
    singles = best_per_method(sweep, cfg.rule.model_dump())

    report_dir = out / "frontier"
    report_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.base.model_dump(mode="json")
    base["rum"].update(rum_settings)
    frames, settings = {}, {"rum": rum.iloc[0]["settings"].replace(" | ", "; ")}
    failed: dict[str, str] = {}  # single methods whose experiment run failed (e.g. diverged at a later step)
    for method, pick in singles.items():
        if pick is None:
            print(f"{method}: no trial meets the cap RTE <= {cap:g} on the validation request; not reported")
            continue
        data = json.loads(json.dumps(base))
        data["vanilla"] = json.loads(pick["settings_json"])["mix"]
        path, kept = report_dir / f"{method}.yaml", report_dir / f"steps-{method}.parquet"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        if not args.report_only:
            try:
                seconds[f"run {method}"] = run(rumflow + ["run", "--config", str(path), "--out", str(out)])
            except RunFailed as exc:
                failed[method] = str(exc)
                kept.unlink(missing_ok=True)
                continue
            shutil.copyfile(out / cfg.base.name / "steps.parquet", kept)
        if not kept.exists():
            failed.setdefault(method, "not run")
            continue
        frames[method] = pd.read_parquet(kept)
        settings[method] = pick["settings"].replace(" | ", "; ")
    if not frames:
        raise SystemExit("no single method has a setting under the cap; nothing to report")

    first = next(iter(frames.values()))
    rows = [summarize("rum", final_rows(first, "rum"), cap) | {"setting": settings["rum"]}]
    per_step = [final_rows(first, "rum").assign(strategy_label="rum")]
    for method, steps in frames.items():
        v = final_rows(steps, "vanilla")
        rows.append(summarize(f"single: {method}", v, cap) | {"setting": settings[method]})
        per_step.append(v.assign(strategy_label=f"single: {method}"))
    table = pd.DataFrame(rows)
    detail = (pd.concat(per_step).groupby(["strategy_label", "proxy", "step"])
              .agg(tow=("tow", "mean"), tow_mia=("tow_mia", "mean"), rte_step=("rte_step", "mean"),
                   acc_forget=("acc_forget", "mean"), seeds=("seed", "nunique")).reset_index())
    detail.to_parquet(report_dir / "frontier.parquet", index=False)
    ref = first[first["strategy"] == "retrain"]
    text = "\n".join([
        f"# ToW vs cost on {cfg.base.data.name} ({cfg.base.model.name}): {len(cfg.base.seeds)} seeds x "
        f"{len(cfg.base.proxies)} proxies ({', '.join(cfg.base.proxies)}) x {cfg.base.forget.steps} steps x "
        f"3 x {cfg.base.forget.per_tier}; cap RTE <= {cap:g}; goal ToW and ToW-MIA >= {GOAL_TOW} at every step",
        "", markdown(table), "",
        *[f"single: {m} at {singles[m]['settings'].replace(' | ', '; ')}: no figures, its run failed: {why}"
          for m, why in failed.items()], "",
        f"Retrain reference: {ref['seconds'].mean():.1f} s mean wall time per step ({len(ref)} references), "
        f"forget accuracy {ref['acc_forget'].mean():.4f}. Wall seconds of this benchmark: "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f"; cores {os.cpu_count()}.",
        "", "Per proxy and step (means over seeds):", "",
        plain_table(detail)])
    (report_dir / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
