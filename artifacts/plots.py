"""Report figures (PNG, Agg canvas, no pyplot state) drawn from the seed summary table, each written
atomically. Input: the DataFrame of `rumflow.stats.summarize` (columns `<metric>_mean`/`<metric>_ci95`)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# One look per strategy in every figure.
STYLE = {
    "rum": dict(color="#1f77b4", marker="o", linestyle="-", label="RUM"),
    "vanilla": dict(color="#d62728", marker="s", linestyle="-", label="vanilla"),
    "retrain": dict(color="#333333", marker="", linestyle="--", label="retrain (reference)"),
    "original": dict(color="#7f7f7f", marker="*", linestyle="", label="original (step 0)"),
}
DPI = 120
MIN_WIDTH = 7.0  # inches: room for the title and the legend when there is a single proxy


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (os.replace), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return Path(path)


def _series(summary: pd.DataFrame, proxy: str, strategy: str, metric: str) -> tuple[np.ndarray, ...]:
    """(steps, means, half widths) of one metric for one proxy and strategy, sorted by step."""
    g = summary[(summary["proxy"] == proxy) & (summary["strategy"] == strategy)].sort_values("step")
    if f"{metric}_mean" not in g.columns or g.empty:
        return np.array([]), np.array([]), np.array([])
    x = g["step"].to_numpy(dtype=float)
    m = g[f"{metric}_mean"].to_numpy(dtype=float)
    h = g[f"{metric}_ci95"].to_numpy(dtype=float)
    keep = ~np.isnan(m)
    return x[keep], m[keep], h[keep]


def _draw(ax, summary: pd.DataFrame, proxy: str, strategy: str, metric: str, offset: float = 0.0) -> bool:
    """Plot one strategy's mean line and (where known) its interval bars; False if it has no data."""
    x, m, h = _series(summary, proxy, strategy, metric)
    if x.size == 0:
        return False
    style = dict(STYLE.get(strategy, dict(label=strategy)))
    color = style.get("color")
    ax.plot(x + offset, m, linewidth=1.6, markersize=6 if style.get("marker") != "*" else 11, **style)
    known = np.isfinite(h)
    if known.any():
        ax.errorbar(x[known] + offset, m[known], yerr=h[known], fmt="none", ecolor=color, elinewidth=1,
                    capsize=3)
    return True


def _grid(n_rows: int, proxies: list[str]) -> tuple[Figure, np.ndarray]:
    n_cols = max(len(proxies), 1)
    fig = Figure(figsize=(max(3.6 * n_cols + 0.6, MIN_WIDTH), 2.7 * n_rows + 1.1), layout="constrained")
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False, sharex=True))
    return fig, axes


def _finish(fig: Figure, axes: np.ndarray, proxies: list[str], row_labels: list[str], title: str) -> None:
    for j, proxy in enumerate(proxies):
        axes[0, j].set_title(f"proxy: {proxy}")
        axes[-1, j].set_xlabel("unlearning step k")
    for i, label in enumerate(row_labels):
        axes[i, 0].set_ylabel(label)
    for ax in axes.ravel():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    handles: dict = {}
    for ax in axes.ravel():
        for hdl, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, hdl)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
               ncol=max(len(handles), 1), frameon=False)
    fig.suptitle(title)


def _subtitle(summary: pd.DataFrame) -> str:
    n = int(summary["n_seeds"].max()) if "n_seeds" in summary.columns and len(summary) else 0
    if n <= 1:
        return "one seed: no interval bars"
    return f"mean over {n} seeds, bars: 95% t-interval"


def _proxies(summary: pd.DataFrame) -> list[str]:
    return sorted(p for p in summary["proxy"].dropna().unique() if p is not None)


def plot_tow(summary: pd.DataFrame, path: Path) -> Path:
    """ToW (top row) and ToW-MIA (bottom row) over the K steps, one column per proxy, RUM vs vanilla,
    mean over seeds with 95% t-interval bars; the retrain reference is 1 by definition."""
    proxies = _proxies(summary)
    fig, axes = _grid(2, proxies)
    for j, proxy in enumerate(proxies):
        for i, metric in enumerate(("tow", "tow_mia")):
            ax = axes[i, j]
            _draw(ax, summary, proxy, "rum", metric, -0.04)
            _draw(ax, summary, proxy, "vanilla", metric, +0.04)
            ax.axhline(1.0, **{k: v for k, v in STYLE["retrain"].items() if k != "marker"}, linewidth=1)
            ax.set_ylim(top=1.02)
    _finish(fig, axes, proxies, ["ToW", "ToW-MIA"], f"ToW and ToW-MIA per step\n{_subtitle(summary)}")
    return _save(fig, path)


def plot_accuracy(summary: pd.DataFrame, path: Path) -> Path:
    """Forget / retain / test accuracy per step (rows), one column per proxy: RUM, vanilla and the
    retrain reference (dashed), plus the original model at step 0; 95% t-interval bars."""
    proxies = _proxies(summary)
    rows = [("acc_forget", "forget accuracy"), ("acc_retain", "retain accuracy"), ("acc_test", "test accuracy")]
    fig, axes = _grid(len(rows), proxies)
    for j, proxy in enumerate(proxies):
        for i, (metric, _) in enumerate(rows):
            ax = axes[i, j]
            _draw(ax, summary, proxy, "retrain", metric, 0.0)
            _draw(ax, summary, proxy, "rum", metric, -0.05)
            _draw(ax, summary, proxy, "vanilla", metric, +0.05)
            _draw(ax, summary, proxy, "original", metric, 0.0)
    _finish(fig, axes, proxies, [label for _, label in rows],
            f"Accuracy vs the retrain reference\n{_subtitle(summary)}")
    return _save(fig, path)


def plot_runtime(summary: pd.DataFrame, path: Path) -> Path:
    """Runtime efficiency per step: unlearning seconds / retrain seconds (RUM summed over its tiers)."""
    proxies = _proxies(summary)
    fig, axes = _grid(1, proxies)
    for j, proxy in enumerate(proxies):
        ax = axes[0, j]
        _draw(ax, summary, proxy, "rum", "rte_step", -0.04)
        _draw(ax, summary, proxy, "vanilla", "rte_step", +0.04)
        ax.axhline(1.0, **{k: v for k, v in STYLE["retrain"].items() if k != "marker"}, linewidth=1)
        ax.set_ylim(bottom=0)
    _finish(fig, axes, proxies, ["seconds / retrain seconds"],
            f"Runtime relative to retraining, per step\n{_subtitle(summary)}")
    return _save(fig, path)


def plot_proxy_histograms(scores: dict[str, np.ndarray], path: Path) -> Path:
    """One histogram per memorization proxy (score -> count of training examples)."""
    names = list(scores)
    fig = Figure(figsize=(max(3.6 * max(len(names), 1) + 0.6, MIN_WIDTH), 3.0), layout="constrained")
    axes = np.asarray(fig.subplots(1, max(len(names), 1), squeeze=False))
    for ax, name in zip(axes[0], names):
        v = np.asarray(scores[name], dtype=float)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=40, color=STYLE["rum"]["color"], alpha=0.8)
        ax.set_title(f"proxy: {name}")
        ax.set_xlabel("score")
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("training examples")
    fig.suptitle("Memorization proxy scores")
    return _save(fig, path)


def plot_frontier(sweep: pd.DataFrame, path: Path, max_rte: float) -> Path:
    """ToW and ToW-MIA of every selection trial against its step's RTE (sweep.parquet): one colour per
    method combination, circles RUM and squares vanilla, the selected trials ringed, the cost cap dashed."""
    fig = Figure(figsize=(MIN_WIDTH + 3.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    ok = sweep[np.isfinite(sweep["rte_step_max"].to_numpy(dtype=float))]
    labels = list(dict.fromkeys(f"{s}: {m}" for s, m in zip(ok["strategy"], ok["label"])))
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    marks = {"rum": "o", "vanilla": "s"}
    for ax, metric, name in zip(axes, ("tow", "tow_mia"), ("ToW", "ToW-MIA")):
        for lab in labels:
            strategy, method = lab.split(": ", 1)
            g = ok[(ok["strategy"] == strategy) & (ok["label"] == method)]
            ax.scatter(g["rte_step_max"], g[metric], color=colors[lab], marker=marks.get(strategy, "^"), s=30,
                       label=lab, alpha=0.85)
        chosen = ok[ok["selected"]]
        ax.scatter(chosen["rte_step_max"], chosen[metric], s=180, facecolors="none", edgecolors="black",
                   linewidths=1.6, label="selected")
        ax.axvline(max_rte, color="#333333", linestyle="--", linewidth=1, label=f"cap RTE = {max_rte:g}")
        ax.set_xlabel("RTE of the step (unlearning s / retrain s)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    handles: dict = {}
    for hdl, lab in zip(*axes[0].get_legend_handles_labels()):
        handles.setdefault(lab, hdl)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center", frameon=False,
               fontsize="small")
    fig.suptitle("Selection frontier on the validation requests")
    return _save(fig, path)
