"""Regenerate a run's report from its folder alone: summary.parquet, summary.md and PNG figures.

Inputs are read only from the run folder (`steps.parquet`; optionally `proxies.parquet`, or the flow's
`examples.parquet`, for proxy histograms); outputs hold only relative links, so a copied folder still
regenerates and renders. Every file is written to a temporary name and then `os.replace`d.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from rumflow.artifacts.tables import read_parquet, write_parquet, write_text
from rumflow.artifacts.plots import (plot_accuracy, plot_proxy_histograms, plot_runtime,
                                     plot_tow)
from rumflow.metrics import add_derived_columns
from rumflow.stats import summarize

FIGURES_DIR = "figures"
STRATEGY_ORDER = ("rum", "vanilla", "retrain", "original")
FINAL_TABLE = (("tow", "ToW"), ("tow_mia", "ToW-MIA"), ("acc_forget", "acc forget"),
               ("acc_retain", "acc retain"), ("acc_test", "acc test"), ("mia", "MIA"),
               ("rte_step", "RTE"))


def _fmt(mean: float, half: float) -> str:
    """'0.912 ± 0.013'; '0.912 ± n/a' when the interval is unknown (one seed); '–' when missing."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if half is None or (isinstance(half, float) and math.isnan(half)):
        return f"{mean:.3f} ± n/a"
    return f"{mean:.3f} ± {half:.3f}"


def _values(series: pd.Series) -> str:
    vals = [str(v) for v in pd.unique(series.dropna())]
    return ", ".join(vals) if vals else "–"


def is_report_output(rel: str) -> bool:
    """Whether a run-folder path (relative, posix) is one `build_report` writes (and so may rewrite)."""
    return rel in ("summary.parquet", "summary.md") or (rel.startswith(f"{FIGURES_DIR}/") and rel.endswith(".png"))


def _readable_optional(run_dir: Path, name: str) -> Path | None:
    """`run_dir/name` if it is there and belongs to the finished run: when the folder has a manifest,
    a file it does not list (left by a run of another config) is ignored."""
    path = run_dir / name
    if not path.is_file():
        return None
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        import json

        try:
            listed = {e["path"] for e in json.loads(manifest.read_text())["outputs"]}
        except (OSError, ValueError, KeyError, TypeError):
            return path  # an unreadable manifest is refused before the report by the CLI
        if name not in listed:
            return None
    return path


def _strategy_rank(s: str) -> int:
    return STRATEGY_ORDER.index(s) if s in STRATEGY_ORDER else len(STRATEGY_ORDER)


def final_step_table(summary: pd.DataFrame) -> str:
    """Markdown table of the last step (per proxy x strategy): ToW, ToW-MIA, accuracies, MIA, RTE."""
    k = summary.loc[summary["strategy"] != "original", "step"].max()
    last = summary[(summary["step"] == k) & (summary["strategy"] != "original")]
    last = last.assign(_r=last["strategy"].map(_strategy_rank)).sort_values(["proxy", "_r"], kind="stable")
    cols = [(m, label) for m, label in FINAL_TABLE if f"{m}_mean" in summary.columns]
    lines = ["| proxy | strategy | seeds | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|---:|" + "---:|" * len(cols)]
    for _, row in last.iterrows():
        cells = [_fmt(row[f"{m}_mean"], row[f"{m}_ci95"]) for m, _ in cols]
        lines.append(f"| {row['proxy']} | {row['strategy']} | {int(row['n_seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _proxy_scores(run_dir: Path, proxies: list[str]) -> dict[str, np.ndarray]:
    """Per-proxy scores of the training examples on the original model, if the run folder has them:
    `proxies.parquet` (long: proxy + score, or wide: one column per proxy) or the flow's
    `examples.parquet` (one column per proxy, step 0 rows). Empty when neither is present."""
    for name in ("proxies.parquet", "examples.parquet"):
        path = _readable_optional(run_dir, name)
        if path is None:
            continue
        table = read_parquet(path)
        if "step" in table.columns and (table["step"] == 0).any():
            table = table[table["step"] == 0]
        if {"proxy", "score"} <= set(table.columns):
            return {str(p): g["score"].to_numpy(dtype=float) for p, g in table.groupby("proxy", sort=True)}
        wide = {p: table[p].to_numpy(dtype=float) for p in proxies
                if p in table.columns and pd.api.types.is_numeric_dtype(table[p])}
        if wide:
            return wide
    return {}


def markdown_table(df: pd.DataFrame) -> str:
    """A plain Markdown table (numbers to 4 significant digits)."""
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def optional_sections(run_dir: Path) -> list[str]:
    """Markdown tables of the optional outputs present in the run folder (proxy quality, forgetting quality)."""
    sections = []
    for name, title in (("proxies.parquet", "Proxy quality"), ("forgetting_quality.parquet", "Forgetting quality")):
        path = _readable_optional(run_dir, name)
        if path is not None:
            df = read_parquet(path).drop(columns=["run", "config_sha"], errors="ignore")
            sections += [f"## {title} (`{name}`)", "", markdown_table(df), ""]
    return sections


def render_markdown(steps: pd.DataFrame, summary: pd.DataFrame, figures: list[Path],
                    extra: list[str] | None = None) -> str:
    """The short Markdown summary of a run; figure links are relative to the run folder."""
    seeds = sorted(int(s) for s in steps["seed"].dropna().unique())
    k_max = int(steps["step"].max()) if len(steps) else 0
    lines = [
        f"# rumflow run `{_values(steps['run']) if 'run' in steps else '–'}`",
        "",
        f"- config sha256: `{_values(steps['config_sha']) if 'config_sha' in steps else '–'}`",
        f"- seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}); proxies: {_values(steps['proxy'])}; "
        f"steps K = {k_max}",
    ]
    for col in ("rumflow_version", "torch_version", "device"):
        if col in steps.columns:
            lines.append(f"- {col.replace('_', ' ')}: {_values(steps[col])}")
    lines += [
        "- values: mean ± 95% Student-t half width over seeds (n - 1 degrees of freedom); "
        "'n/a' = one seed, interval unknown.",
        "- ToW / ToW-MIA compare each model with the retrain reference of the same seed, proxy and step "
        "(retrain = 1); RTE = unlearning seconds / retrain seconds (RUM: summed over its tiers).",
        "",
        f"## Final step (k = {k_max})",
        "",
        final_step_table(summary),
        "",
        *(extra or []),
        "## Figures",
        "",
    ]
    captions = {"tow.png": "ToW and ToW-MIA per step", "accuracy.png": "Accuracy vs the retrain reference",
                "runtime.png": "Runtime relative to retraining", "proxies.png": "Memorization proxy scores"}
    for fig in figures:
        rel = f"{FIGURES_DIR}/{fig.name}"
        lines += [f"![{captions.get(fig.name, fig.stem)}]({rel})", ""]
    lines += ["All per-step numbers: `summary.parquet` (seed statistics) and `steps.parquet` (every row).", ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path) -> list[Path]:
    """Rebuild the report of the run in `run_dir` from `steps.parquet`; return the files written:
    summary.parquet, figures/tow.png, figures/accuracy.png, figures/runtime.png,
    [figures/proxies.png,] summary.md. Derived columns (ToW, ToW-MIA, RTE) are recomputed with
    `rumflow.metrics.add_derived_columns`, the same code the flow uses."""
    run_dir = Path(run_dir)
    steps_path = run_dir / "steps.parquet"
    if not steps_path.is_file():
        raise FileNotFoundError(f"no steps.parquet in {run_dir}; run the experiment first "
                                "(the report is built from that table)")
    try:
        steps = add_derived_columns(read_parquet(steps_path))
        summary = summarize(steps)
    except (KeyError, ValueError) as exc:  # a readable Parquet file that is not a rumflow steps table
        from rumflow.errors import DataError

        what = (f"the column {exc}" if isinstance(exc, KeyError)
                else f"what a steps table holds ({str(exc).split(';')[0]})")
        raise DataError(f"{steps_path} lacks {what}, so it is not a rumflow steps table; re-run the experiment "
                        "(the same command) to rewrite it.") from None
    written = [write_parquet(summary, run_dir / "summary.parquet")]
    fig_dir = run_dir / FIGURES_DIR
    figures = [plot_tow(summary, fig_dir / "tow.png"),
               plot_accuracy(summary, fig_dir / "accuracy.png"),
               plot_runtime(summary, fig_dir / "runtime.png")]
    scores = _proxy_scores(run_dir, sorted(map(str, steps["proxy"].dropna().unique())))
    if scores:
        figures.append(plot_proxy_histograms(scores, fig_dir / "proxies.png"))
    written += figures
    written.append(write_text(render_markdown(steps, summary, figures, optional_sections(run_dir)), run_dir / "summary.md"))
    return written
