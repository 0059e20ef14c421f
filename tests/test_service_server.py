"""`rumflow serve` against a real `prefect server start` subprocess (temporary PREFECT_HOME, a free loopback
port): the served deployment processes two requests over two scheduled runs. Select with `-m server`."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_service_flow import add, folder, make_service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (serve pauses its deployment, the server shuts down), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.server
def test_a_served_deployment_processes_two_requests_over_two_scheduled_runs(prefect_api, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_PORT": str(port), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
           # services this test does not need: on a loaded machine they lock the server's SQLite database
           **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in (
               "LATE_RUNS", "FOREMAN", "TRIGGERS", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "REPOSSESSOR")}}
    prefect = Path(sys.executable).with_name("prefect")
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        root = make_service(tmp_path / "svc", batch="one")  # meanwhile, on the test harness's API
        train = folder(root).train_ids()
        add(root, train[:6])
        add(root, train[50:56])

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, "the Prefect server")
        serve = subprocess.Popen([sys.executable, "-m", "rumflow.cli", "serve", "--service", str(root), "--interval",
                                  "10"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        f = folder(root)
        try:
            wait_for(lambda: len(f.ledger.rows()) == 2, 300, "both requests to be processed")
        except AssertionError:
            stop(serve)
            stop(server)
            raise AssertionError(serve.stdout.read().decode()[-3000:] + server.stdout.read().decode()[-3000:]) from None
        rows = f.ledger.rows()
        assert [(r["request_id"], r["state"], r["parent_version"], r["version"]) for r in rows] == [
            ("r1", "done", 0, 1), ("r2", "done", 1, 2)]
        run_ids = [r["flow_run_id"] for r in rows]
        assert run_ids[0] != run_ids[1]  # two scheduled runs, one request each
        deployments = httpx.post(f"{url}/deployments/filter", json={}, timeout=10).json()
        (dep,) = [d for d in deployments if d["name"] == "tiny-svc"]
        assert dep["schedules"] and dep["schedules"][0]["schedule"]["interval"] == 10.0
        for run_id in run_ids:
            run = httpx.get(f"{url}/flow_runs/{run_id}", timeout=10).json()
            assert run["deployment_id"] == dep["id"] and run["state_type"] in ("COMPLETED", "RUNNING")
    finally:
        if serve is not None:
            stop(serve)
        stop(server)


def test_serve_says_what_to_start_when_no_server_answers(tmp_path):
    port = free_port()  # nothing listens there
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    out = subprocess.run([sys.executable, "-m", "rumflow.cli", "serve", "--service", str(tmp_path), "--interval", "5"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "is not a service folder" in out.stderr
    (tmp_path / "service.yaml").write_text("name: x\n")
    (tmp_path / "ledger.sqlite").write_text("")
    out = subprocess.run([sys.executable, "-m", "rumflow.cli", "serve", "--service", str(tmp_path), "--interval", "5"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"no Prefect server answers at http://127.0.0.1:{port}/api" in out.stderr
    assert "start one with `prefect server start`" in out.stderr
    env.pop("PREFECT_API_URL")
    out = subprocess.run([sys.executable, "-m", "rumflow.cli", "serve", "--service", str(tmp_path), "--cron",
                          "0 2 * * *"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "PREFECT_API_URL is not set; start one with `prefect server start`" in out.stderr
