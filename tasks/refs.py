"""What tasks pass to each other: small, relative references to files in the run folder.

Every reference knows how to check that its files are still what was written (`intact(run_dir)`);
the record store calls it on every cache hit, so a changed file recomputes its task."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from rumflow.artifacts.checkpoints import CheckpointRef, CheckpointStore
from rumflow.artifacts.tables import write_parquet
from rumflow.planning import StepPlan
from rumflow.tasks.records import record_type

record_type(StepPlan)


def store(workdir: str | Path) -> CheckpointStore:
    """The run folder's checkpoint store."""
    return CheckpointStore(Path(workdir) / "checkpoints")


def frame_digest(df: pd.DataFrame) -> str:
    """The content digest of a scores table (16 hex digits, as in its file name)."""
    return hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()[:16]


def write_scores(workdir: str | Path, name: str, ids: np.ndarray, values: dict[str, np.ndarray]) -> str:
    """Write a scores table named by its content digest; returns its path relative to the run folder."""
    df = pd.DataFrame({"example_id": ids, **values})
    rel = f"scores/{name}-{frame_digest(df)}.parquet"
    write_parquet(df, Path(workdir) / rel)
    return rel


def scores_intact(run_dir: str | Path, rel: str) -> bool:
    """The scores file exists and its content still has the digest in its name."""
    path = Path(run_dir) / rel
    try:
        return path.is_file() and frame_digest(pd.read_parquet(path)) == path.stem.rsplit("-", 1)[-1]
    except Exception:
        return False


@record_type
class Trained(BaseModel):
    """A trained model plus what its training measured."""

    model_config = ConfigDict(frozen=True)
    ckpt: CheckpointRef
    seconds: float
    events: str | None = None  # relative path of the learning-event proxies, when recorded
    events_seconds: float = 0.0

    def intact(self, run_dir: str | Path) -> bool:
        return store(run_dir).intact(self.ckpt) and (self.events is None or scores_intact(run_dir, self.events))

    def cache_identity(self) -> dict[str, str | None]:
        """What a downstream key holds: the weights' and events' content digests (not the seconds)."""
        return {"weights": self.ckpt.sha256, "events": self.events}


@record_type
class Scores(BaseModel):
    """Per-example scores of one proxy, stored as Parquet (example_id, score)."""

    model_config = ConfigDict(frozen=True)
    proxy: str
    path: str  # relative to the run folder
    seconds: float

    def intact(self, run_dir: str | Path) -> bool:
        return scores_intact(run_dir, self.path)

    def cache_identity(self) -> dict[str, str]:
        """The proxy and its table's content-digest path (not the seconds)."""
        return {"proxy": self.proxy, "scores": self.path}

    def load(self, run_dir: str | Path) -> pd.DataFrame:
        return pd.read_parquet(Path(run_dir) / self.path)


@record_type
class Unlearned(BaseModel):
    """The model after one unlearning call (or a method's prepared state), with its cost."""

    model_config = ConfigDict(frozen=True)
    ckpt: CheckpointRef
    seconds: float
    examples: int = 0  # examples forwarded through the model (the budget actually used)

    def intact(self, run_dir: str | Path) -> bool:
        return store(run_dir).intact(self.ckpt)

    def cache_identity(self) -> dict[str, str]:
        """What a downstream key holds: the content digest of the weights (not seconds or examples)."""
        return {"weights": self.ckpt.sha256}


@record_type
class ChainRecord(BaseModel):
    """What a finished (seed, proxy) chain hands its experiment: per step, its steps.parquet rows (without
    the run's provenance columns, which the run adds), the step plans, the scores recomputed on the way,
    and every model its rows name (checked on a cache hit, like any reference)."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")  # a NaN metric stays NaN
    rows: list[list[dict[str, Any]]]
    plans: list[StepPlan]
    recomputed: list[tuple[int, Scores]] = []
    models: list[CheckpointRef]

    def intact(self, run_dir: str | Path) -> bool:
        checkpoints = store(run_dir)
        return (all(checkpoints.intact(ref) for ref in self.models)
                and all(s.intact(run_dir) for _, s in self.recomputed))
