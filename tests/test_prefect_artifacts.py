"""Publishing artifacts through the real Prefect API (a temporary test server; no mocks)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from prefect import flow
from apihelpers import read_artifacts

from rumflow.artifacts.prefect_artifacts import (advance_progress, artifact_key, publish_step_table,
                                                 publish_summary, start_progress, step_table_key)


@pytest.mark.parametrize("parts, key", [
    (("Digits_Demo", "s0", "Learning Events", "step3"), "digits-demo-s0-learning-events-step3"),
    (("run.v1/2", "--x--"), "run-v1-2-x"),
    (("ABC", "", "__", 7), "abc-7"),
    (("été", "ok"), "t-ok"),
])
def test_artifact_key_sanitizes(parts, key):
    assert artifact_key(*parts) == key
    assert set(key) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


def test_artifact_key_rejects_empty():
    with pytest.raises(ValueError, match="artifact key"):
        artifact_key("__", "  ")


def test_step_table_key_shape():
    assert step_table_key("My_Run", 2, "holdout_retrain", 4) == "my-run-s2-holdout-retrain-step4"


def test_publish_through_real_prefect(prefect_api):
    rows = [
        {"strategy": "rum", "stage": "high", "acc_test": np.float32(0.5), "tow": 0.91, "n_forget": np.int64(30),
         "final": np.bool_(True)},
        {"strategy": "retrain", "stage": "mix", "acc_test": 0.94, "tow": float("nan"), "n_forget": 30,
         "final": True},
    ]

    @flow(name="rumflow-artifacts-test")
    def tiny(run: str) -> dict:
        from prefect.runtime import flow_run

        pid = start_progress(f"{run}-s0", total=4)
        advance_progress(pid, 1, 4)
        advance_progress(pid, 3, 4)
        tid = publish_step_table(run, 0, "Learning_Events", 1, rows)
        sid = publish_summary(run, "# summary\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![ToW](figures/tow.png)\n",
                              "/runs/demo")
        return {"progress": pid, "table": tid, "summary": sid, "flow_run": flow_run.id}

    ids = tiny("Demo_Run")

    tables = read_artifacts("demo-run-s0-learning-events-step1")
    assert len(tables) == 1
    table = tables[0]
    assert table.id == ids["table"] and table.type == "table"
    assert str(table.flow_run_id) == str(ids["flow_run"])
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["strategy"] for r in data] == ["rum", "retrain"]
    assert data[0]["acc_test"] == pytest.approx(0.5) and list(data[0]) == ["strategy", "stage", "acc_test", "tow"]
    assert data[0]["tow"] == 0.91  # metrics first, rounded; the rest of a row is provenance
    assert data[1]["tow"] is None  # NaN is published as a missing cell

    (summary,) = read_artifacts("demo-run-summary")
    assert summary.type == "markdown" and summary.data.startswith("# summary")
    assert "![" not in summary.data and "/runs/demo/figures/tow.png" in summary.data  # no broken images

    (progress,) = read_artifacts(artifact_id=ids["progress"])
    assert progress.key == "demo-run-s0-progress" and progress.type == "progress"
    assert float(progress.data) == pytest.approx(75.0)
    assert progress.description == "3 of 4 done"
