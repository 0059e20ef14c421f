"""Kill a real `rumflow run` mid-way under each task runner, resume it, and compare with an uninterrupted run.

    OMP_NUM_THREADS=1 python scripts/kill_resume.py [--runners threads processes ray dask]
                                                    [--signals TERM KILL] [--out DIR]

For every (runner, signal): start `rumflow run` (a real CLI process in its own session, a small digits
experiment on that runner), wait until some of its checkpoints are written, then
  TERM: send SIGTERM to the rumflow process only (what `timeout`, systemd and Kubernetes send) and check
        that it exits within a few seconds with status 143 and that no process of its session is left
        (workers, the Ray cluster it started, the embedded Prefect server);
  KILL: SIGKILL the whole process group (a crash: nothing can clean up) and check that no process of its
        session is left 30 s later (Ray's workers run in process groups of their own and exit by
        themselves once their raylet is gone).
Then run the same command again to the end and check that its steps.parquet (timings aside) and
examples.parquet equal those of an uninterrupted threads run, and that `rumflow verify` passes.
Prints one line per case and PASS/FAIL; exit status 1 if any case failed. Runners whose extra is not
installed are reported as skipped. tests/test_runners.py runs two of these cases in the suite.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

CONFIG = {
    "name": "killed",
    "train": {"epochs": 3},
    "proxies": ["confidence"],
    "forget": {"steps": 3, "per_tier": 5},
    "rum": {"low": {"method": "none"}, "mid": {"method": "finetune", "epochs": 1},
            "high": {"method": "neggrad_plus", "epochs": 1}},
    "vanilla": {"method": "neggrad_plus", "epochs": 1},
    "seeds": [0],
}
TIME = {"seconds", "seconds_step", "retrain_seconds", "rte", "rte_step", "efficient", "host"}
EXTRA = {"ray": "prefect_ray", "dask": "prefect_dask"}
KILL_GRACE = 30.0  # seconds an orphan of a SIGKILLed run may take to notice and exit


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """A steps table without the columns that differ between runs by nature (wall times, host)."""
    keys = ["seed", "proxy", "strategy", "step", "stage"]
    return df.drop(columns=[c for c in df.columns if c in TIME]).sort_values(keys, ignore_index=True)


def session_processes(sid: int) -> list[str]:
    """Live (non-zombie) processes of session `sid`, as 'pid name'."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[3]) == sid and rest[0] not in ("Z", "X"):
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120].strip()
            except OSError:
                cmd = name
            out.append(f"{entry} {cmd or name}")
    return out


def write_config(folder: Path, kind: str) -> Path:
    """The experiment config on runner `kind`, as a YAML file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "runner": {"kind": kind, "workers": 2}}))
    return path


def command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rumflow.cli", "run", "--config", str(config), "--out", str(out)]


def kill_midway(cmd: list[str], run_dir: Path, sig: str, env: dict[str, str], min_checkpoints: int = 5,
                wait: float = 300) -> tuple[str, list[str]]:
    """Start cmd, signal it once `min_checkpoints` checkpoints exist; (what happened, processes left)."""
    log = run_dir.parent / "killed-run.log"  # a file, not a pipe: a full pipe would stall the run
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    output = lambda: log.read_bytes()  # noqa: E731
    ckpts, deadline = run_dir / "checkpoints", time.time() + wait
    while time.time() < deadline and proc.poll() is None and len(list(ckpts.glob("*.pt"))) < min_checkpoints:
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"the run ended (status {proc.returncode}) before it could be killed: "
                           + output().decode()[-1500:])
    done = len(list(ckpts.glob("*.pt")))
    if sig == "KILL":
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Processes in process groups of their own (Ray's workers) outlive the group kill; they must go by
        # themselves once what they serve is gone (a Ray worker exits when its raylet dies).
        start = time.perf_counter()
        orphans = left = session_processes(proc.pid)
        while left and time.perf_counter() - start < KILL_GRACE:
            time.sleep(0.25)
            left = session_processes(proc.pid)
        gone = f", {len(orphans)} orphan(s) gone by themselves {time.perf_counter() - start:.1f} s later" if (
            orphans and not left) else ""
        return f"SIGKILL after {done} checkpoints{gone}", left
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"SIGTERM after {done} checkpoints: still running 30 s later (killed)", session_processes(proc.pid)
    seconds = time.perf_counter() - start
    time.sleep(2.0)  # children get a moment to go after their parent
    left = session_processes(proc.pid)
    for line in left:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    hint = "resume hint printed" if b"run the same command again" in output() else "NO resume hint"
    return f"SIGTERM after {done} checkpoints: exit {status} in {seconds:.1f} s, {hint}", left


def case(kind: str, sig: str, root: Path, baseline: Path, env: dict[str, str]) -> tuple[bool, str]:
    """One (runner, signal) case; (passed, its line)."""
    out = root / f"{kind}-{sig.lower()}"
    cmd = command(write_config(root / "configs", kind), out)
    what, left = kill_midway(cmd, out / CONFIG["name"], sig, env)
    start = time.perf_counter()
    log = out / "resumed-run.log"
    with open(log, "wb") as sink:
        resumed = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=900)
    seconds = time.perf_counter() - start
    if resumed.returncode != 0:
        return False, f"{what}; the re-run failed ({resumed.returncode}), see {log}: {log.read_text()[-600:]}"
    run_dir = out / CONFIG["name"]
    same = True
    try:
        pd.testing.assert_frame_equal(comparable(pd.read_parquet(run_dir / "steps.parquet")),
                                      comparable(pd.read_parquet(baseline / "steps.parquet")))
        pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "examples.parquet"),
                                      pd.read_parquet(baseline / "examples.parquet"))
    except AssertionError as exc:
        same, what = False, what + f"; Parquet differs: {str(exc)[:300]}"
    verify = subprocess.run([sys.executable, "-m", "rumflow.cli", "verify", str(run_dir)], env=env,
                            capture_output=True, text=True)
    exited = not what.startswith("SIGTERM") or (" exit 143 " in what and "resume hint printed" in what)
    ok = same and verify.returncode == 0 and not left and exited and not list(run_dir.rglob("*.tmp"))
    line = (f"{what}; left behind: {', '.join(left) or 'nothing'}; re-run {seconds:.0f} s; Parquet "
            f"{'equal to the uninterrupted run' if same else 'DIFFERENT'}; verify "
            f"{'ok' if verify.returncode == 0 else 'FAILED: ' + verify.stdout[-300:]}")
    return ok, line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runners", nargs="+", default=["threads", "processes", "ray", "dask"])
    ap.add_argument("--signals", nargs="+", default=["TERM", "KILL"], choices=["TERM", "KILL"])
    ap.add_argument("--out", default=None, help="parent of the run folders (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="rumflow-kill-")).resolve()
    home = tempfile.mkdtemp(prefix="rumflow-kill-prefect-")
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    baseline_out = root / "uninterrupted"
    done = subprocess.run(command(write_config(root / "configs", "threads"), baseline_out), env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        print(done.stdout[-1500:] + done.stderr[-1500:])
        return 1
    baseline = baseline_out / CONFIG["name"]
    print(f"uninterrupted threads run: {len(pd.read_parquet(baseline / 'steps.parquet'))} rows ({baseline})")
    failed = 0
    for kind in args.runners:
        if kind in EXTRA:
            try:
                __import__(EXTRA[kind])
            except ImportError:
                print(f"SKIP {kind}: its extra is not installed (pip install -e '.[{kind}]')")
                continue
        for sig in args.signals:
            try:
                ok, line = case(kind, sig, root, baseline, env)
            except Exception as exc:  # noqa: BLE001 (a case that cannot run is a failed case, said once)
                ok, line = False, f"{type(exc).__name__}: {exc}"
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {kind:<9} {sig:<4} {line}", flush=True)
    print("all cases passed" if not failed else f"{failed} case(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
