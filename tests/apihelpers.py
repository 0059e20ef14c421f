"""Reading back what runs recorded in the real Prefect API (used by several test modules)."""
from __future__ import annotations

import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterId, ArtifactFilterKey, FlowRunFilter,
                                            FlowRunFilterId)
from prefect.client.schemas.objects import Artifact
from prefect.client.schemas.sorting import TaskRunSort


def read_artifacts(key: str | None = None, artifact_id=None) -> list[Artifact]:
    """Artifacts matching a key (or an id), read back through the Prefect client.

    `client.read_artifacts` cannot be used as is here: it sends JSON nulls for the filters it is not
    given, which this server (FastAPI 0.154) rejects with 422, and any non-null task-run filter drops
    the artifacts made at flow level. So the same filter is POSTed with the omitted fields left out.
    """
    flt = (ArtifactFilter(key=ArtifactFilterKey(any_=[key])) if key is not None
           else ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    body = {"artifacts": flt.model_dump(mode="json", exclude_unset=True), "limit": 50, "offset": 0,
            "sort": "CREATED_DESC"}
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter", json=body)
        response.raise_for_status()
    return Artifact.model_validate_list(response.json())


def task_states(flow_run_id) -> list[tuple[str, str]]:
    """(task run name, state name) of every task run of a flow run and of its subflow runs (the
    experiment's chains and steps), once they have all reached the API. The task runs Prefect creates
    for subflow calls are left out (the chain tasks, cached units of their own, are kept)."""
    from rumflow.artifacts.runfolder import flow_run_tree

    def read_all(client) -> list:
        flt = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_tree(client, flow_run_id)))
        runs: list = []
        while True:
            page = client.read_task_runs(flow_run_filter=flt, sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                                         limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                return runs

    with get_client(sync_client=True) as client:
        runs: list = []
        for _ in range(50):  # task runs reach the API through events: wait until they have all landed
            runs = read_all(client)
            if runs and all(r.state is not None and r.state.is_final() for r in runs):
                break
            time.sleep(0.2)
    return [(r.name, r.state.name) for r in runs if not orchestration(r)]


def orchestration(run) -> bool:
    """A task run Prefect creates in a parent flow run for a subflow call."""
    return run.task_key.startswith(("chain_flow-", "step_flow-"))


def run_experiment(config: dict, out: Path):
    """Run the experiment flow in this process; returns (run folder, flow run id)."""
    from rumflow.config import validate_config
    from rumflow.flows.experiment import configured

    cfg = validate_config(config)
    state = configured(cfg)(cfg, out=str(out), return_state=True)
    assert state.is_completed(), state
    return Path(state.result()), state.state_details.flow_run_id
