"""Run-folder integrity with real files corrupted by the tests: the lock (concurrent holders, a SIGKILLed
holder, a reused pid), the INCOMPLETE marker and the manifest written last, `verify` on bit flips in
checkpoints, scores and Parquet outputs, and full disks (a write failing with ENOSPC, a real tiny tmpfs)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rumflow.artifacts import runfolder
from rumflow.artifacts.checkpoints import state_digest
from rumflow.artifacts.tables import write_parquet, write_text
from rumflow.errors import DataError, DiskFullError, OutputError, RunFolderBusy, RunFolderError

DIGEST = "c0ffee" * 10 + "abcd"


# ---------------------------------------------------------------------------------------------- helpers

def flip_bit(path: Path, offset: int | None = None) -> None:
    """Flip one bit in the middle of the file (same size)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def make_run(run_dir: Path) -> list[Path]:
    """A finished-looking run folder: two checkpoints, a scores file, steps/examples tables; returns the
    outputs (not yet finished)."""
    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(2):
        state = {"w": torch.randn(16, 8, generator=gen), "b": torch.full((16,), float(i))}
        digest = state_digest(state)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save(state, run_dir / "checkpoints" / f"{digest}.pt")
        names.append(digest)
    scores = pd.DataFrame({"example_id": np.arange(50), "score": np.random.default_rng(0).random(50)})
    write_parquet(scores, run_dir / "scores" / f"confidence-{runfolder.scores_digest(scores)}.parquet")
    steps = pd.DataFrame({"run": "demo", "config_sha": DIGEST, "seed": [0, 0], "checkpoint": names,
                          "acc_forget": [0.9, 0.7]})
    examples = pd.DataFrame({"run": "demo", "config_sha": DIGEST, "example_id": np.arange(50),
                             "confidence": np.linspace(0, 1, 50)})
    return [write_parquet(steps, run_dir / "steps.parquet"), write_parquet(examples, run_dir / "examples.parquet")]


@pytest.fixture
def finished(tmp_path) -> Path:
    run_dir = tmp_path / "demo"
    runfolder.mark_incomplete(run_dir)
    outputs = make_run(run_dir)
    runfolder.finish(run_dir, "name: demo\n", outputs, DIGEST)
    return run_dir


def holder_script(run_dir: Path, digest: str = DIGEST, seconds: float = 60) -> list[str]:
    """A separate Python process that holds `run_dir`, says 'held' (or 'busy ...'), then sleeps."""
    code = textwrap.dedent(f"""
        import sys, time
        from rumflow.artifacts.runfolder import hold
        from rumflow.errors import RunFolderBusy
        try:
            with hold({str(run_dir)!r}, {digest!r}, "other") as held:
                held.set_flow_run("11111111-2222-3333-4444-555555555555")
                print("held", flush=True)
                time.sleep({seconds})
        except RunFolderBusy as exc:
            print("busy", exc, flush=True)
    """)
    return [sys.executable, "-c", code]


def wait_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    line = proc.stdout.readline()
    assert time.time() < deadline and line, "the holder process said nothing"
    return line.strip()


# ---------------------------------------------------------------------------------------------- the lock

def test_a_live_holder_refuses_a_second_run_and_a_killed_one_is_taken_over(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.Popen(holder_script(run_dir), stdout=subprocess.PIPE, text=True)
    try:
        assert wait_line(proc) == "held"
        lock = json.loads((run_dir / runfolder.LOCK).read_text())
        assert lock["pid"] == proc.pid and lock["config_digest"] == DIGEST
        assert lock["flow_run_id"] == "11111111-2222-3333-4444-555555555555"
        started = time.monotonic()
        with pytest.raises(RunFolderBusy) as info:
            with runfolder.hold(run_dir, "another-config", "mine"):
                pass
        assert time.monotonic() - started < 5, "a busy folder must be refused at once, not waited for"
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and "run 'other'" in msg and "choose another --out" in msg
        assert "\n" not in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died without cleaning up: its lock is stale, taken over, and says which flow run it was
    assert (run_dir / runfolder.LOCK).exists()
    (run_dir / ".steps.parquet.abc123.tmp").write_bytes(b"half")  # what an interrupted write leaves
    with runfolder.hold(run_dir, "another-config", "mine") as held:
        assert held.stale is not None and held.stale.pid == proc.pid
        assert held.stale.flow_run_id == "11111111-2222-3333-4444-555555555555"
        assert json.loads((run_dir / runfolder.LOCK).read_text())["pid"] == os.getpid()
        assert not (run_dir / ".steps.parquet.abc123.tmp").exists()
        with runfolder.hold(run_dir, "another-config", "mine") as inner:  # the flow inside the CLI
            assert inner is held
        assert (run_dir / runfolder.LOCK).exists(), "the inner hold must not release the outer one"
        with pytest.raises(RunFolderBusy, match="already held by this process"):
            with runfolder.hold(run_dir, "a-third-config", "mine"):
                pass
    assert not (run_dir / runfolder.LOCK).exists()


def test_concurrent_starters_exactly_one_holds(tmp_path):
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    procs = [subprocess.Popen(holder_script(run_dir, f"config-{i}", seconds=3), stdout=subprocess.PIPE, text=True)
             for i in range(4)]
    answers = [wait_line(p) for p in procs]
    for p in procs:
        p.wait(timeout=60)
    assert sorted(a.split()[0] for a in answers) == ["busy", "busy", "busy", "held"], answers
    assert all("is in use by run 'other'" in a or "claimed by another run" in a for a in answers if a != "held")
    assert not (run_dir / runfolder.LOCK).exists()


def test_a_lock_whose_pid_was_reused_is_stale(tmp_path):
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        real = runfolder._this_holder(DIGEST, "old")
        fake = {**real.__dict__, "pid": sleeper.pid, "process_start": "1", "flow_run_id": None}
        (run_dir / runfolder.LOCK).write_text(json.dumps(fake))
        if real.process_start is None:
            pytest.skip("no /proc: process start times are unknown here")
        with runfolder.hold(run_dir, DIGEST, "new") as held:
            assert held.stale is not None and held.stale.pid == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_from_another_host_is_not_guessed_dead(tmp_path):
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    info = {**runfolder._this_holder(DIGEST, "remote").__dict__, "host": "elsewhere.example", "pid": 1}
    (run_dir / runfolder.LOCK).write_text(json.dumps(info))
    with pytest.raises(RunFolderBusy, match="on elsewhere.example.*if that run is no longer alive, delete"):
        with runfolder.hold(run_dir, DIGEST, "here"):
            pass


def test_a_killed_runs_flow_run_is_marked_crashed(prefect_api, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="rumflow-integrity-killed")
    def killed() -> None:
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(killed, state=Running())
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {**runfolder._this_holder(DIGEST, "old").__dict__, "pid": int(dead.stdout), "flow_run_id": str(run.id)}
    (run_dir / runfolder.LOCK).write_text(json.dumps(info))
    with runfolder.hold(run_dir, DIGEST, "new") as held:
        assert held.stale is not None and held.stale.flow_run_id == str(run.id)
        assert runfolder.mark_crashed(held.stale.flow_run_id) is True
        assert runfolder.mark_crashed(held.stale.flow_run_id) is False  # already final: left alone
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.type.value == "CRASHED"


# ---------------------------------------------------------------------------------------------- manifest

def test_finish_writes_config_then_manifest_last_and_verify_is_clean(finished):
    manifest = json.loads((finished / runfolder.MANIFEST).read_text())
    assert [e["path"] for e in manifest["outputs"]] == ["config.yaml", "examples.parquet", "steps.parquet"]
    assert manifest["config_digest"] == DIGEST and manifest["rumflow_version"]
    assert not (finished / runfolder.MARKER).exists()
    assert (finished / "config.yaml").read_text() == "name: demo\n"
    assert runfolder.verify(finished) == []
    assert runfolder.check_complete(finished)["config_digest"] == DIGEST


def test_a_failed_run_leaves_the_folder_marked_incomplete_and_the_old_config(finished):
    runfolder.mark_incomplete(finished)  # a new run starts, with another config, and then fails
    write_parquet(pd.DataFrame({"config_sha": ["f" * 64], "seed": [1]}), finished / "steps.parquet")
    assert (finished / "config.yaml").read_text() == "name: demo\n", "only finish() writes config.yaml"
    assert not (finished / runfolder.MANIFEST).exists()
    problems = runfolder.verify(finished)
    assert any("is incomplete" in p and "run the same command again" in p for p in problems), problems
    with pytest.raises(RunFolderError, match="is incomplete"):
        runfolder.check_complete(finished)


def test_verify_names_every_corruption(finished):
    ckpts = sorted((finished / "checkpoints").glob("*.pt"))
    flip_bit(ckpts[0], ckpts[0].stat().st_size - 300)  # tensor bytes near the end: same size, other weights
    ckpts[1].write_bytes(b"")
    (scores,) = (finished / "scores").glob("*.parquet")
    value = pd.read_parquet(scores)["score"].to_numpy()[17].tobytes()
    flip_bit(scores, scores.read_bytes().index(value) + 3)  # inside one stored score: the data changes
    flip_bit(finished / "steps.parquet")
    (finished / "examples.parquet").write_bytes(b"")
    write_parquet(pd.DataFrame({"x": [1]}), finished / "forgetting_quality.parquet")  # from another run
    (finished / "figures").mkdir()
    (finished / "figures" / "proxies.png").write_bytes(b"\x89PNG old")
    problems = runfolder.verify(finished)
    text = "\n".join(problems)

    def one(fragment: str) -> str:
        hits = [p for p in problems if fragment in p]
        assert hits, f"no line mentions {fragment!r}:\n{text}"
        return hits[0]

    assert "does not match its name" in one(f"checkpoints/{ckpts[0].name}") or "not a readable" in one(
        f"checkpoints/{ckpts[0].name}")
    assert "empty (0 bytes)" in one(f"checkpoints/{ckpts[1].name}")
    assert ("does not match the digest in its name" in one(f"scores/{scores.name}")
            or "not a readable Parquet file" in one(f"scores/{scores.name}"))
    assert "does not match its sha256 in manifest.json" in one("steps.parquet does not")
    assert "does not match its sha256" in one("examples.parquet does not")
    assert "empty (0 bytes)" in one("examples.parquet is empty")
    assert "not part of the finished run" in one("forgetting_quality.parquet")
    assert "not part of the finished run" in one("figures/proxies.png")
    assert all("\n" not in p for p in problems)


def test_verify_checkpoints_named_in_steps_and_rows_of_another_config(tmp_path):
    run_dir = tmp_path / "demo"
    runfolder.mark_incomplete(run_dir)
    outputs = make_run(run_dir)
    steps = pd.read_parquet(run_dir / "steps.parquet")
    write_parquet(steps.assign(config_sha=["a" * 64, DIGEST]), run_dir / "steps.parquet")
    runfolder.finish(run_dir, "name: demo\n", outputs, DIGEST)
    next(iter((run_dir / "checkpoints").glob("*.pt"))).unlink()
    (run_dir / "checkpoints" / ".leftover.pt.x.tmp").write_bytes(b"x")
    problems = runfolder.verify(run_dir)
    assert any("holds rows of config aaaaaaaaaaaa" in p for p in problems), problems
    assert any("1 checkpoint(s) named in steps.parquet are missing" in p for p in problems), problems
    assert any("temporary file left by an interrupted write" in p for p in problems), problems


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_planted_as_a_checkpoint_is_never_unpickled(finished, tmp_path):
    """verify loads checkpoints with weights_only=True: a planted pickle is refused, its code never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    planted = finished / "checkpoints" / ("e" * 64 + ".pt")
    planted.write_bytes(pickle.dumps(Payload()))
    problems = runfolder.verify(finished)
    assert any(planted.name in p and "not a readable checkpoint" in p for p in problems), problems
    assert not marker.exists()


def test_report_refreshes_the_manifest(finished):
    from test_report import synthetic_steps

    from rumflow.artifacts.report import build_report

    steps = synthetic_steps().assign(config_sha=DIGEST).drop(columns="checkpoint", errors="ignore")
    outputs = [write_parquet(steps, finished / "steps.parquet"), finished / "examples.parquet"]
    runfolder.finish(finished, "name: demo\n", outputs, DIGEST)
    written = build_report(finished)
    assert runfolder.verify(finished) != [], "new report files are not in the manifest yet"
    runfolder.refresh(finished, written)
    assert runfolder.verify(finished) == []


# ---------------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize("damage", ["zero", "truncate", "scramble"])
def test_damaged_parquet_is_one_sentence(tmp_path, damage):
    from test_report import synthetic_steps

    from rumflow.artifacts.report import build_report

    path = tmp_path / "steps.parquet"
    synthetic_steps().to_parquet(path, index=False)
    data = path.read_bytes()
    if damage == "zero":
        path.write_bytes(b"")
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        rng = np.random.default_rng(0)
        path.write_bytes(data[:4] + rng.permutation(np.frombuffer(data[4:-8], np.uint8)).tobytes() + data[-8:])
    with pytest.raises(DataError) as info:
        build_report(tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "re-run the same command" in msg and "\n" not in msg


def test_a_readable_table_without_the_steps_columns(tmp_path):
    from rumflow.artifacts.report import build_report

    pd.DataFrame({"x": [1, 2]}).to_parquet(tmp_path / "steps.parquet")
    with pytest.raises(DataError, match="lacks .* so it is not a rumflow steps table"):
        build_report(tmp_path)


# ---------------------------------------------------------------------------------------------- full disks

def test_a_write_failing_with_enospc_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "steps.parquet"
    write_text("old", target)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError) as info:
        write_parquet(pd.DataFrame({"a": range(10)}), target)
    assert str(info.value) == (f"the disk holding {tmp_path} is full (while writing steps.parquet); free space "
                               "and run again; nothing was half-written.")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.parquet"]


def test_a_replace_failing_leaves_no_temporary_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match="read-only"):
        write_text("x", tmp_path / "summary.md")
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real small tmpfs (root only); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_real_full_disk(tmp_path):
    with tmpfs(tmp_path / "small", "size=1m") as disk:
        old = write_text("old summary", disk / "summary.md")
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last page
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        with pytest.raises(DiskFullError, match=r"the disk holding .*small is full .*nothing was half-written"):
            write_parquet(pd.DataFrame({"a": np.arange(100_000)}), disk / "summary.md")
        assert old.read_text() == "old summary"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "summary.md"]
        with pytest.raises(DiskFullError, match="is full"):
            runfolder.check_writable(disk / "run")


def test_read_only_and_file_outputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        runfolder.check_writable(tmp_path / "afile" / "demo")
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        with pytest.raises(OutputError, match="read-only"):
            runfolder.check_writable(ro / "runs" / "demo")
