"""Thin publishers of Prefect artifacts (progress, per-step tables, the run summary) for tasks and flows.

Artifact keys must be lowercase letters, digits and dashes: every key goes through `artifact_key`.
The functions run synchronously even when called from async code (`_sync=True`).
"""
from __future__ import annotations

import math
import re
from typing import Any
from uuid import UUID

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

_INVALID = re.compile(r"[^a-z0-9]+")


def artifact_key(*parts: Any) -> str:
    """A valid Prefect artifact key from `parts`: lowercased, every run of other characters (``_``,
    ``.``, spaces, ``/``...) turned into one dash, parts joined by dashes, no leading/trailing or
    doubled dashes. Raises ValueError if nothing alphanumeric is left."""
    pieces = [_INVALID.sub("-", str(p).lower()).strip("-") for p in parts]
    key = "-".join(p for p in pieces if p)
    if not key:
        raise ValueError(f"cannot build an artifact key from {parts!r}: no letters or digits")
    return key


def step_table_key(run: str, seed: int, proxy: str, step: int) -> str:
    """`<run>-s<seed>-<proxy>-step<k>`, sanitized."""
    return artifact_key(run, f"s{seed}", proxy, f"step{step}")


def _percent(done: float, total: float) -> float:
    if total <= 0:
        return 100.0
    return float(min(max(100.0 * done / total, 0.0), 100.0))


def start_progress(key_prefix: str, total: int, description: str | None = None) -> UUID:
    """Create a progress artifact at 0% under key `<key_prefix>-progress`; returns its id."""
    return create_progress_artifact(
        progress=0.0, key=artifact_key(key_prefix, "progress"),
        description=description or f"0 of {total} done", _sync=True)


def advance_progress(artifact_id: UUID, done: int, total: int) -> None:
    """Set the progress artifact to done/total (as a percentage, clamped to 0-100)."""
    update_progress_artifact(artifact_id=artifact_id, progress=_percent(done, total),
                             description=f"{done} of {total} done", _sync=True)


def _cell(v: Any) -> Any:
    """A JSON-safe table cell: numpy scalars to Python, NaN/inf to None, other objects to str."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


# What a step table shows first, in this order; the rest of a row is provenance, told in the description.
STEP_COLUMNS = ("strategy", "stage", "method", "acc_forget", "acc_retain", "acc_test", "mia", "tow", "tow_mia",
                "seconds", "rte_step")
PROVENANCE = ("run", "config_sha", "code_sha", "rumflow_version", "torch_version", "device", "host")


def _rounded(v: Any) -> Any:
    v = _cell(v)
    return round(v, 3) if isinstance(v, float) else v


def publish_step_table(key_prefix: str, seed: int, proxy: str, step: int, rows: list[dict[str, Any]]) -> UUID:
    """Publish one step's rows as a table artifact keyed `<key_prefix>-s<seed>-<proxy>-step<k>`: the
    metrics first, rounded to 3 decimals; provenance in the description."""
    table = [{k: _rounded(row.get(k)) for k in STEP_COLUMNS if k in row} for row in rows]
    first = rows[0] if rows else {}
    origin = ", ".join(f"{k} {first[k]}" for k in PROVENANCE if k in first)
    return create_table_artifact(
        table=table, key=step_table_key(key_prefix, seed, proxy, step),
        description=f"seed {seed}, proxy {proxy}, step {step}; {origin}", _sync=True)


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")


def without_local_images(markdown: str, run_dir: str | None = None) -> str:
    """The summary for the UI: the UI cannot load the run folder's PNGs (they would show as broken
    images), so each becomes a line naming its file."""
    where = f"{run_dir}/" if run_dir else ""
    return _IMAGE.sub(lambda m: f"*Figure ({m.group(1) or 'plot'}): `{where}{m.group(2)}`*", markdown)


def publish_summary(key_prefix: str, markdown: str, run_dir: str | None = None) -> UUID:
    """Publish the run's Markdown summary under key `<key_prefix>-summary` (figures named, not embedded)."""
    return create_markdown_artifact(markdown=without_local_images(markdown, run_dir),
                                    key=artifact_key(key_prefix, "summary"),
                                    description=f"summary of run {key_prefix}", _sync=True)
