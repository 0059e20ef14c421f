"""The `rumflow` command on bad input (one sentence, exit 2, nothing done), `verify` and `report` on
intact and damaged folders, and SIGTERM of a real `rumflow run` (prompt exit, resume hint, no process
left behind)."""
from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rumflow.artifacts import runfolder
from rumflow.artifacts.tables import write_parquet
from rumflow.cli import RESUME_HINT, main

DIGEST = "d1" * 32


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip()


def refused(capsys, out_dir: Path, *argv: str) -> str:
    """Run `rumflow run` in-process; assert exit 2 with one line on stderr and nothing written; return it."""
    before = sorted(out_dir.rglob("*")) if out_dir.exists() else []
    started = time.monotonic()
    code, _, err = run_cli(capsys, "run", "--out", str(out_dir), *argv)
    assert code == 2, err
    assert err.startswith("rumflow: error: ") and len(err.splitlines()) == 1, err
    assert time.monotonic() - started < 30, "bad input must be refused before any work"
    assert (sorted(out_dir.rglob("*")) if out_dir.exists() else []) == before, "something was written"
    return err


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("sets, fragment", [
    (["device=foo"], "unknown device 'foo'"),
    (["device=cuda:99"], "cuda:99"),
    (["data.split_seed=-1"], "data.split_seed: must be a seed between 0 and"),
    (["seeds=[-1]"], "seeds: must be a seed between 0 and"),
    (["train.lr=.inf"], "train.lr: must be a finite number, not inf"),
    (["train.lr=.nan"], "train.lr: must be a finite number, not nan"),
    (["train.epochs=yes"], "train.epochs: must be a number, not the yes/no value True"),
    (["rum.high.epochs=yes"], "hyperparameter 'epochs' must be a number"),
])
def test_bad_values_exit_2_before_any_work(capsys, tmp_path, sets, fragment):
    args = [a for s in sets for a in ("--set", s)]
    assert fragment in refused(capsys, tmp_path / "out", *args)


def test_cuda_without_a_gpu(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = refused(capsys, tmp_path / "out", "--set", "device=cuda")
    assert "has no usable CUDA GPU; use --set device=auto or device=cpu" in err


def test_output_locations_that_cannot_be_written(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file, not a folder" in refused(capsys, afile)
    assert "is a file, not a folder" in refused(capsys, afile / "below")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "digits-demo").write_text("not a folder")
    assert "is a file, not a folder" in refused(capsys, tmp_path / "runs")
    if os.geteuid() != 0:  # root writes through permissions; the read-only tmpfs test covers it there
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "permission denied" in refused(capsys, locked)


def test_read_only_output_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        assert "read-only; choose a writable --out folder" in refused(capsys, ro)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def _idx(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 50)):
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 255, (n, 28, 28)))))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(n) % 10)))
    return raw


def test_unreadable_data_files(capsys, tmp_path):
    raw = _mnist(tmp_path / "mnist")
    images = raw / "train-images-idx3-ubyte.gz"
    blob = bytearray(images.read_bytes())
    blob[10] |= 0b110  # the first deflate block's type bits: 11 is reserved ("invalid block type")
    images.write_bytes(bytes(blob))
    err = refused(capsys, tmp_path / "out", "--set", "data.name=mnist", "--set", f"data.root={tmp_path / 'mnist'}")
    assert str(images) in err and "cannot be read" in err and "replace it" in err

    labels = raw / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:25])  # truncated
    images.write_bytes(gzip.compress(_idx(np.zeros((200, 28, 28)))))
    err = refused(capsys, tmp_path / "out", "--set", "data.name=mnist", "--set", f"data.root={tmp_path / 'mnist'}")
    assert str(labels) in err


def test_an_unreachable_prefect_server(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    err = refused(capsys, tmp_path / "out")
    assert "PREFECT_API_URL=http://127.0.0.1:9/api does not answer" in err


def test_a_folder_held_by_a_live_run(capsys, tmp_path):
    from rumflow.config import load_config

    run_dir = tmp_path / "out" / "digits-demo"
    code = (f"from rumflow.artifacts.runfolder import hold; import time\n"
            f"with hold({str(run_dir)!r}, 'x' * 64, 'digits-demo'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        err = refused(capsys, tmp_path / "out")
        assert f"is in use by run 'digits-demo' (pid {proc.pid}" in err
    finally:
        proc.kill()
        proc.wait()
    assert load_config().digest() != "x" * 64


def test_verbose_shows_task_run_logs():
    from rumflow import cli

    saved = os.environ.get("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL")
    try:
        os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] = "WARNING"
        cli._prefect_environment(verbose=True)
        assert os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] == "INFO"
        cli._task_log_level(True)
        assert logging.getLogger("prefect.task_runs").getEffectiveLevel() == logging.INFO
        cli._task_log_level(False)
        assert logging.getLogger("prefect.task_runs").getEffectiveLevel() == logging.WARNING
    finally:
        logging.getLogger("prefect.task_runs").setLevel(logging.NOTSET)
        if saved is None:
            os.environ.pop("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", None)
        else:
            os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] = saved


# ---------------------------------------------------------------------------------------------- verify, report

@pytest.fixture
def finished(tmp_path) -> Path:
    """A complete run folder whose steps table the report can use."""
    from test_report import synthetic_steps

    run_dir = tmp_path / "demo"
    runfolder.mark_incomplete(run_dir)
    steps = synthetic_steps().assign(config_sha=DIGEST).drop(columns="checkpoint", errors="ignore")
    runfolder.finish(run_dir, "name: demo\n", [write_parquet(steps, run_dir / "steps.parquet")], DIGEST)
    return run_dir


def test_verify_command(capsys, finished):
    code, out, _ = run_cli(capsys, "verify", str(finished))
    assert code == 0 and "intact" in out
    data = bytearray((finished / "steps.parquet").read_bytes())
    data[len(data) // 2] ^= 1
    (finished / "steps.parquet").write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "verify", str(finished))
    assert code == 1
    assert "steps.parquet does not match its sha256 in manifest.json" in out


def test_report_checks_the_folder_first(capsys, finished):
    code, out, err = run_cli(capsys, "report", str(finished))
    assert code == 0, err
    assert "summary.md" in out and runfolder.verify(finished) == [], "the report's files join the manifest"

    runfolder.mark_incomplete(finished)
    code, _, err = run_cli(capsys, "report", str(finished))
    assert code == 2 and "is incomplete (its last run did not finish)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("damage", ["zero", "truncate", "scramble"])
def test_report_refuses_a_damaged_steps_table(capsys, finished, damage):
    path = finished / "steps.parquet"
    data = path.read_bytes()
    path.write_bytes({"zero": b"", "truncate": data[: len(data) // 3], "scramble": data[::-1]}[damage])
    summary = (finished / "summary.md").exists()
    code, _, err = run_cli(capsys, "report", str(finished))
    assert code == 2 and len(err.splitlines()) == 1
    assert "refusing to report: steps.parquet does not match its sha256 in manifest.json" in err
    assert (finished / "summary.md").exists() == summary


def test_report_on_a_full_disk(capsys, finished, monkeypatch):
    import errno

    old = (finished / "manifest.json").read_text()
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the summary is written (the lock still fits)
        if "summary.parquet" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, "report", str(finished))
    assert code == 2 and len(err.splitlines()) == 1
    assert f"the disk holding {finished} is full (while writing summary.parquet)" in err
    assert "nothing was half-written" in err
    assert not list(finished.rglob("*.tmp")) and (finished / "manifest.json").read_text() == old


# ---------------------------------------------------------------------------------------------- SIGTERM

def _session(sid: int) -> list[tuple[int, str]]:
    """Live processes of session `sid` (the test starts `rumflow` as a session leader)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append((int(entry), cmd))
    return found


def test_sigterm_stops_a_real_run_promptly_and_leaves_no_process(tmp_path):
    """A real `rumflow run --verbose` on its embedded Prefect server: once a task run has logged (so
    --verbose works) and training is under way, SIGTERM; it must exit within ~10 s with the resume hint,
    and nothing of its session (the server, workers) may survive."""
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)  # the embedded server: the child process that must not be orphaned
    sets = ["name=sig", "train.epochs=15", "proxies=[confidence]", "forget.steps=1", "forget.per_tier=5",
            "seeds=[0]", "rum.mid.method=finetune", "rum.mid.epochs=1", "rum.high.method=finetune",
            "rum.high.epochs=1", "vanilla.method=finetune", "vanilla.epochs=1", "evaluate.mia=false"]
    cmd = [sys.executable, "-m", "rumflow.cli", "run", "--verbose", "--out", str(tmp_path)]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # the first finished task run's log line
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Task run '" in line and "Finished in state" in line:
                break
        assert any("Task run '" in line for line in lines), "".join(lines)[-3000:]
        assert proc.poll() is None, "the run ended before it could be stopped"
        lock = json.loads((tmp_path / "sig" / runfolder.LOCK).read_text())
        assert lock["pid"] == proc.pid and lock["flow_run_id"], "the flow run id is recorded in the lock"
        children = _session(proc.pid)
        assert any("uvicorn" in c for _, c in children), children  # the embedded server runs
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines) + rest
    assert took < 10, f"took {took:.1f}s to stop"
    assert proc.returncode == 128 + signal.SIGTERM
    assert RESUME_HINT in output
    time.sleep(0.5)
    assert _session(proc.pid) == [], "a child process survived"
    for pid, _ in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_verify_refuses_planted_and_altered_task_records(capsys, finished, tmp_path):
    """A cloudpickle record planted in cache/ is reported, never unpickled; a record whose JSON body was
    altered no longer matches its digest."""
    import base64
    import pickle

    records = pytest.importorskip("rumflow.tasks.records")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cache = finished / "cache"
    cache.mkdir()
    planted = {"metadata": {"serializer": {"type": "pickle", "picklelib": "cloudpickle"}, "storage_key": "x"},
               "result": base64.b64encode(pickle.dumps(Payload())).decode()}
    (cache / "planted").write_text(json.dumps(planted))
    good = records.encode_result({"acc_forget": 0.7}).decode()
    altered = good.replace("0.7", "0.9")
    for name, result in (("good", good), ("altered", altered)):
        body = {"metadata": {"serializer": {"type": records.SERIALIZER}, "storage_key": name}, "result": result}
        (cache / name).write_text(json.dumps(body))
    code, out, _ = run_cli(capsys, "verify", str(finished))
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2, out
    assert lines[0].startswith("cache/altered is not a valid task record")
    assert lines[1].startswith("cache/planted is not a valid task record") and "pickle" in lines[1]
    assert not marker.exists()


TINY_SETS = ["train.epochs=2", "proxies=[confidence]", "forget.steps=1", "forget.per_tier=5", "seeds=[0]",
             "rum.mid.method=finetune", "rum.mid.epochs=1", "rum.high.method=finetune", "rum.high.epochs=1",
             "vanilla.method=finetune", "vanilla.epochs=1", "evaluate.mia=false"]


def test_the_next_run_marks_a_killed_runs_flow_run_crashed(prefect_api, capsys, tmp_path):
    """A run SIGKILLed in a folder leaves its lock and a flow run stuck in Running; the next `rumflow run`
    there takes the stale lock over and marks that flow run Crashed."""
    import prefect
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="rumflow-killed-run")
    def killed() -> None:
        pass

    with get_client(sync_client=True) as client:
        stuck = client.create_flow_run(killed, state=Running())
        # one of its chain subflows, left Running too
        call = client.create_task_run(prefect.task(lambda: None, name="rumflow-chain"), flow_run_id=stuck.id,
                                      dynamic_key="0")
        sub = client.create_flow_run(killed, state=Running(), parent_task_run_id=call.id)
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {**runfolder._this_holder(DIGEST, "tiny").__dict__, "pid": int(dead.stdout), "flow_run_id": str(stuck.id)}
    (run_dir / runfolder.LOCK).write_text(json.dumps(lock))
    code, out, err = run_cli(capsys, "run", "--out", str(tmp_path), "--set", "name=tiny",
                             *[a for s in TINY_SETS for a in ("--set", s)])
    assert code == 0, err
    assert "Results:" in out
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(stuck.id).state.type.value == "CRASHED"
        assert client.read_flow_run(sub.id).state.type.value == "CRASHED"
    assert not (run_dir / runfolder.LOCK).exists()
