"""The service flows on tiny digits settings against a real Prefect API (the test harness): a step that
processes two requests, an idle run, gates that reject a version, SIGKILL in the middle of a step and its
completion by the next run, and two runs started at once on one service."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from apihelpers import read_artifacts, task_states
from pgcluster import fresh_schema, pg_admin_url

TINY_SERVICE = {
    "name": "tiny-svc",
    "train": {"epochs": 2},
    "holdout": {"max_epochs": 1},
    "rum": {"low": {"method": "none"}, "mid": {"method": "finetune", "epochs": 1},
            "high": {"method": "neggrad_plus", "epochs": 1}},
    "evaluate": {"mia_max_shadow": 100},
    "lease": {"wait": 240},
}


@pytest.fixture(scope="session")
def pg_admin():
    """The admin URL of a throwaway PostgreSQL cluster (skips where initdb or psycopg is missing)."""
    yield from pg_admin_url()


def make_service(path: Path, **over) -> Path:
    """A created service (version 0 trained) in `path`."""
    from rumflow.flows.service import create_folder, service_create
    from rumflow.service import validate_service_config

    root = create_folder(validate_service_config({**TINY_SERVICE, **over}), path)
    state = service_create(str(root), return_state=True)
    assert state.is_completed(), state
    return root


def folder(root: Path):
    from rumflow.service import ServiceFolder

    return ServiceFolder.open(root)


def add(root: Path, ids, request_id=None) -> str:
    f = folder(root)
    return f.ledger.add_request(list(ids), f.train_ids(), request_id)["request_id"]


def step(root: Path):
    from rumflow.flows.service import service_step

    state = service_step(str(root), return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def cli(root: Path, *args: str) -> list[str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return [sys.executable, "-m", "rumflow.cli", *args, "--service", str(root)], env


def test_a_step_unlearns_two_requests_then_an_idle_run_finishes_at_once(prefect_api, tmp_path):
    root = make_service(tmp_path / "svc")
    train = folder(root).train_ids()
    add(root, train[:6])
    add(root, train[100:130:3], "ticket-2")
    result, run_id = step(root)
    assert result["status"] == "done" and result["version"] == 1 and result["requests"] == ["r1", "ticket-2"]
    f = folder(root)
    rows = f.ledger.rows()
    assert [r["request_id"] for r in rows] == ["r1", "ticket-2"]
    row = rows[0]
    assert row["n_examples"] == 6 and row["n_step_examples"] == 16
    assert row["tier_low"] + row["tier_mid"] + row["tier_high"] == 16
    assert row["parent_version"] == 0 and row["version"] == 1 and row["promoted"] == 1
    assert row["sha256"] == f.ledger.current()[1] != row["parent_sha256"]
    for key in ("acc_forget", "acc_test", "acc_retain", "acc_retain_prev", "mia", "mia_heldout", "forget_p"):
        assert np.isfinite(row["figures"][key]), key
    assert {g["gate"] for g in row["gates"]} == {"forget_alpha", "max_retain_drop", "max_test_drop"}
    assert row["flow_run_id"] == str(run_id) and row["methods"]["high"]["method"] == "neggrad_plus"
    assert f.ledger.forgotten() == sorted(list(train[:6]) + list(train[100:130:3]))
    assert (f.model_path(row["sha256"])).is_file()
    names = {name for name, _ in task_states(run_id)}
    assert {"score v0/holdout_retraining", "unlearn v1/mid/finetune", "evaluate v1",
            "evaluate v0 (parent of v1)"} <= names, names
    table = read_artifacts("tiny-svc-step-1")[0]
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["request"] for r in data] == ["r1", "ticket-2"] and data[0]["version"] == "v1"
    assert data[0]["gate_forget_alpha"] == "pass" and data[0]["promoted"] is True
    assert read_artifacts("tiny-svc-step-1-progress")[0].data == 100.0

    start = time.monotonic()
    idle, _ = step(root)
    assert idle == {"status": "idle"} and time.monotonic() - start < 30


def misclassified(f) -> list[int]:
    """The training ids that the current production model gets wrong."""
    from rumflow.runtime import dataset_on, model_from_state
    from rumflow.service import load_weights
    from rumflow.training import predict

    ds = dataset_on(f.cfg.data, "cpu")
    _, sha = f.ledger.current()
    net = model_from_state(f.cfg.model, ds, load_weights(f.model_path(sha), sha))
    wrong = predict(net, ds.train.x).argmax(1) != ds.train.y
    return ds.train.ids()[wrong.cpu().numpy()].tolist()


def deploy(root: Path, name: str):
    """Register the service's step deployment on the API, as `rumflow serve` does (without serving it)."""
    from prefect.deployments.runner import EntrypointType

    from rumflow.flows.service import service_step

    return service_step.to_deployment(name=name, parameters={"service": str(root)},
                                      entrypoint_type=EntrypointType.MODULE_PATH).apply()


def execute(run_id):
    """Run a deployment's flow run here as the serve process's child does (`python -m prefect.engine`):
    the same engine call on the run read back from the API."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from rumflow.flows.service import service_step

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return run_flow(service_step, flow_run=run, return_type="state")


def retry(run_id) -> None:
    """What the UI's Retry button sends (Prefect 3's UI: set_state AwaitingRetry, force)."""
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, AwaitingRetry(message="Retry from the UI"), force=True)


def read_run(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def test_a_version_that_forgets_too_much_is_kept_unpromoted_and_its_run_fails_then_retry_does_nothing(
        prefect_api, tmp_path):
    # nothing unlearns (method none on every tier) and the request is examples that version 0 misclassifies:
    # forget accuracy 0 against test accuracy far above it, which a retrain would not show (it scores
    # unseen examples like held-out ones); the two-sided forget gate rejects it
    from prefect.deployments import run_deployment

    from rumflow.flows.service import StepFailed

    none = {"method": "none"}
    root = make_service(tmp_path / "svc", rum={"low": none, "mid": none, "high": none})
    f = folder(root)
    wrong = misclassified(f)
    assert len(wrong) >= 5, "version 0 classifies almost every training example correctly"
    add(root, wrong[:8])
    deployment = deploy(root, "tiny-svc-gate")
    run = run_deployment(deployment, timeout=0)  # the UI's Run; `rumflow serve` would pick it up
    state = execute(run.id)
    req = folder(root).ledger.request("r1")
    assert state.is_failed() and state.message == req["reason"], state
    assert req["state"] == "failed" and "forget_alpha (forget_p = " in req["reason"]
    assert "it forgets too much, itself a membership signal" in req["reason"]
    failure = state.result(raise_on_failure=False)
    assert isinstance(failure, StepFailed) and failure.result["version"] == 1 and not failure.result["promoted"]
    api = read_run(run.id)  # what the UI shows: Failed, with the gate sentence
    assert api.state.type.value == "FAILED" and api.state.message == req["reason"]

    f = folder(root)
    assert f.ledger.current()[0] == 0 and f.ledger.version(1)["promoted"] == 0
    (row,) = f.ledger.rows()
    gate = next(g for g in row["gates"] if g["gate"] == "forget_alpha")
    assert not gate["passed"] and gate["side"] == "below" and row["figures"]["acc_forget"] == 0.0
    assert row["figures"]["forget_gap"] == -row["figures"]["acc_test"] and row["sha256"] == row["parent_sha256"]
    assert f.model_path(row["sha256"]).is_file() and f.ledger.forgotten() == []

    retry(run.id)  # the failed request is no longer queued: the retried run finds nothing to do
    start = time.monotonic()
    again = execute(run.id)
    assert again.is_completed() and again.result() == {"status": "idle"} and time.monotonic() - start < 30
    assert read_run(run.id).run_count == 2
    assert [r["request_id"] for r in folder(root).ledger.rows()] == ["r1"]
    add(root, wrong[:8])  # the ids were not forgotten, so they can be sent again
    import contextlib
    import io

    from rumflow.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the command says what failed and exits 1
        assert main(["service", "step", "--service", str(root)]) == 1
    assert out.getvalue().strip().endswith("step 2: v2 not promoted: " + folder(root).ledger.request("r2")["reason"])


def test_sigkill_in_the_middle_of_a_step_then_the_next_run_completes_it_once(prefect_api, tmp_path):
    root = make_service(tmp_path / "svc")
    f = folder(root)
    train = f.train_ids()
    add(root, train[:30:2])
    add(root, train[200:230:2])
    v0_files = set(f.models.glob("*.pt"))
    records = lambda: len([p for p in (root / "cache").rglob("*") if p.is_file()])  # noqa: E731
    before = records()
    cmd, env = cli(root, "service", "step")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    # kill once the mid tier's weights and its task record are written (score, low, mid): the step is half done
    while time.time() < deadline and proc.poll() is None and not (
            set(f.models.glob("*.pt")) - v0_files and records() >= before + 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert set(f.models.glob("*.pt")) - v0_files, proc.stdout.read().decode()[-3000:]
    assert f.ledger.rows() == [], "the step finished before it was killed"
    assert {r["state"] for r in f.ledger.requests()} == {"running"}  # nothing lost: the step is open

    moved = tmp_path / "moved" / "svc"  # the folder can move: no task input holds an absolute path
    moved.parent.mkdir()
    root.rename(moved)
    root, f = moved, folder(moved)
    result, run_id = step(root)
    assert result["status"] == "done" and result["requests"] == ["r1", "r2"]
    rows = f.ledger.rows()
    assert sorted(r["request_id"] for r in rows) == ["r1", "r2"]  # exactly one row per request
    assert [v["version"] for v in f.ledger.versions()] == [0, 1] and f.ledger.current()[0] == 1
    states = dict(task_states(run_id))
    assert states.get("unlearn v1/mid/finetune") == "Cached", states
    assert step(root)[0] == {"status": "idle"}  # nothing is processed twice


def wait_for(predicate, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM a process group we started (SIGKILL if it lingers); its output."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.stdout.read().decode()[-4000:]


def task_runs(run_id) -> list[tuple[str, str]]:
    """(name, state name) of every task run the API holds for a flow run, whatever its attempts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200)
    return [(r.name, r.state.name if r.state else None) for r in runs]


def test_a_run_killed_mid_step_is_retried_from_the_ui_and_completes_once_with_finished_tiers_cached(
        prefect_api, tmp_path):
    """The served deployment runs a step in its child process; SIGKILL of that process once the first
    tiers are done: `rumflow serve` marks the run Crashed; the UI's Retry reschedules the same flow run,
    serve runs it again, and it completes the step once, its finished tiers' task runs Cached."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    root = make_service(tmp_path / "svc")
    f = folder(root)
    train = f.train_ids()
    add(root, train[:30:2])
    add(root, train[200:230:2])
    v0_files = set(f.models.glob("*.pt"))
    records = lambda: len([p for p in (root / "cache").rglob("*") if p.is_file()])  # noqa: E731
    before = records()
    cmd, env = cli(root, "serve", "--cron", "0 0 1 1 *", "--name", "tiny-svc-retry")  # no scheduled run here
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"  # pick a new or retried run up within a second
    serve = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def deployment():
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name("rumflow-service-step/tiny-svc-retry")
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

        dep = wait_for(lambda: serve.poll() is not None or deployment(), 120, "serve to register its deployment")
        assert serve.poll() is None, stop(serve)
        run = run_deployment(dep.id, timeout=0)  # the UI's Run button
        # kill the process running the step (the lease names it) once score, low and mid are recorded
        wait_for(lambda: serve.poll() is not None or (set(f.models.glob("*.pt")) - v0_files and records() >= before + 3),
                 240, "the first tiers of the step")
        holder = f.ledger.lease_holder()
        assert serve.poll() is None and holder and holder["holder"] == str(run.id), stop(serve)
        os.kill(holder["pid"], signal.SIGKILL)
        crashed = wait_for(lambda: (lambda s: s if s.type.value == "CRASHED" else None)(read_run(run.id).state), 60,
                           "serve to mark the run Crashed")
        assert f.ledger.rows() == [], "the step finished before it was killed"
        assert {r["state"] for r in f.ledger.requests()} == {"running"} and crashed.message

        retry(run.id)  # the UI's Retry: the same flow run, rescheduled
        final = wait_for(lambda: (lambda s: s if s.is_final() else None)(read_run(run.id).state), 240,
                         "the retried run to finish")
        assert final.type.value == "COMPLETED", (final, stop(serve))
    finally:
        out = stop(serve)
    assert read_run(run.id).run_count == 2, out
    rows = f.ledger.rows()
    assert sorted(r["request_id"] for r in rows) == ["r1", "r2"]  # exactly one row per request
    assert {r["flow_run_id"] for r in rows} == {str(run.id)}  # committed by the retried run
    assert [v["version"] for v in f.ledger.versions()] == [0, 1] and f.ledger.current()[0] == 1
    states = task_runs(run.id)
    for name in ("score v0/holdout_retraining", "unlearn v1/low/none", "unlearn v1/mid/finetune"):
        assert (name, "Cached") in states, states
    assert ("unlearn v1/high/neggrad_plus", "Cached") not in states, states  # it had not finished: it ran again
    assert {r["state"] for r in f.ledger.requests()} == {"done"}  # nothing left to process twice


def test_two_runs_started_at_once_do_not_fork_the_chain(prefect_api, tmp_path):
    # the chain is the point here, not the gates: both versions are promoted whatever their figures
    root = make_service(tmp_path / "svc", batch="one", gates={"forget_alpha": None, "max_retain_drop": None,
                                                              "max_test_drop": None})
    train = folder(root).train_ids()
    add(root, train[:8])
    add(root, train[300:308])
    cmd, env = cli(root, "service", "step")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=400)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    f = folder(root)
    versions = f.ledger.versions()
    assert [(v["version"], v["parent"], v["promoted"]) for v in versions] == [(0, None, 1), (1, 0, 1), (2, 1, 1)]
    rows = f.ledger.rows()
    assert sorted(r["request_id"] for r in rows) == ["r1", "r2"]
    assert [r["parent_version"] for r in rows] == [0, 1]


def test_audit_ledger_export_and_model_export(prefect_api, tmp_path):
    # not capsys: Prefect's console log handler would keep its stream, closed after this test
    import contextlib
    import io

    import pandas as pd
    import torch

    from rumflow.cli import main
    from rumflow.flows.service import service_audit

    root = make_service(tmp_path / "svc", audit={"every": 1})
    train = folder(root).train_ids()
    add(root, train[:12])
    result, _ = step(root)
    assert result["status"] == "done" and result["audit"]["version"] == 1  # audit.every: 1
    audit = service_audit(str(root))  # and on demand
    (first, second) = folder(root).ledger.audits()
    assert first["reference_sha256"] == second["reference_sha256"]  # the retrain reference is cached
    assert 0 < audit["tow"] <= 1 and 0 < audit["tow_mia"] <= 1 and first["n_forgotten"] == 12
    assert main(["ledger", "--service", str(root), "--format", "csv", "--out", str(tmp_path / "l.csv")]) == 0
    table = pd.read_csv(tmp_path / "l.csv")
    assert list(table["request_id"]) == ["r1"] and table["gate_forget_alpha"].tolist() == [True]
    assert {"acc_forget", "acc_retain_prev", "sha256", "parent_sha256", "flow_run_id", "tier_high"} <= set(table)
    assert pd.read_csv(tmp_path / "l-audits.csv")["tow"].notna().all()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["ledger", "--service", str(root)]) == 0
        assert main(["model", "export", "--service", str(root), "--version", "9", str(tmp_path / "v9.pt")]) == 2
    assert " r1 " in out.getvalue() and "audits (against a model retrained" in out.getvalue()
    assert "no version 9; versions run from 0 to 1" in err.getvalue()
    assert main(["model", "export", "--service", str(root), "--version", "1", str(tmp_path / "v1.pt")]) == 0
    state = torch.load(tmp_path / "v1.pt", weights_only=True)
    from rumflow.artifacts.checkpoints import state_digest

    assert state_digest(state) == folder(root).ledger.current()[1]


def test_version0_from_a_finished_experiment(prefect_api, tmp_path, tiny_config):
    import pandas as pd
    from apihelpers import run_experiment

    from rumflow.errors import ConfigError

    config = {**tiny_config, "proxies": ["confidence"], "forget": {"steps": 1, "per_tier": 5}}
    run_dir, _ = run_experiment(config, tmp_path / "runs")
    steps = pd.read_parquet(run_dir / "steps.parquet")
    original = steps.loc[(steps["strategy"] == "original") & (steps["seed"] == 0), "checkpoint"].iloc[0]
    root = make_service(tmp_path / "svc", version0={"source": "experiment", "run": str(run_dir), "seed": 0})
    f = folder(root)
    assert f.ledger.current() == (0, original) and f.ledger.version(0)["origin"].startswith("experiment ")
    with pytest.raises(ConfigError, match="has no seed 5; set version0.seed to one of \\[0\\]"):
        make_service(tmp_path / "svc5", version0={"source": "experiment", "run": str(run_dir), "seed": 5})
    with pytest.raises(ConfigError, match="not the service's digits / small_cnn \\(split seed 1\\); make the service"):
        make_service(tmp_path / "svc6", data={"split_seed": 1},
                     version0={"source": "experiment", "run": str(run_dir), "seed": 0})


def test_a_service_on_postgresql_from_the_commands(prefect_api, tmp_path, pg_admin):
    """`store.url` puts the queue and the ledger in PostgreSQL: create, request add/list, a step and the
    ledger all open that database, and the service folder holds no SQLite file."""
    import contextlib
    import io

    import yaml

    from rumflow.artifacts.ledger import LEDGER_FILE, Ledger
    from rumflow.cli import main

    url = fresh_schema(pg_admin)
    none = {"method": "none"}
    config = {**TINY_SERVICE, "rum": {"low": none, "mid": none, "high": none}, "store": {"url": url},
              "gates": {"forget_alpha": None, "max_retain_drop": None, "max_test_drop": None}}
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(config))
    root, out = tmp_path / "svc", io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert main(["service", "create", "--config", str(tmp_path / "service.yaml"), "--dir", str(root)]) == 0
        assert main(["request", "add", "--service", str(root), "--ids", "999999"]) == 2  # refused: not training
        train = folder(root).train_ids()
        ids = ",".join(str(i) for i in train[:5])
        assert main(["request", "add", "--service", str(root), "--ids", ids, "--note", "ticket 7"]) == 0
        assert main(["service", "step", "--service", str(root)]) == 0
        assert main(["request", "list", "--service", str(root)]) == 0
    text = out.getvalue()
    assert "1 of the ids is not in the training set (999999)" in text
    assert "version 0 = " in text and "request r1 queued: 5 examples" in text and "r1           done" in text, text
    assert "step 1: v1 promoted" in text and "production model: v1" in text
    assert not (root / LEDGER_FILE).exists()
    led = Ledger(url)  # the same rows, read straight from the database
    assert led.dialect == "postgresql" and [r["request_id"] for r in led.rows()] == ["r1"]
    assert led.current()[0] == 1 and led.forgotten() == sorted(int(i) for i in train[:5])
    assert led.lease_holder() is None  # the step let go of its lease
    led.close()
