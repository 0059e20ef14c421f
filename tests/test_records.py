"""Task records are checksummed JSON: a damaged or planted record, scores file or checkpoint is never used."""
import json
import pickle
import base64
from pathlib import Path

import pandas as pd
import pytest
from apihelpers import run_experiment, task_states

from rumflow.tasks.records import CorruptRecord, check_record, decode_result, encode_result
from rumflow.tasks.refs import Scores

TIME = {"seconds", "seconds_step", "retrain_seconds", "rte", "rte_step", "host", "efficient"}


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c in TIME])


@pytest.fixture
def one_step(tiny_config):
    return {**tiny_config, "proxies": ["confidence"], "forget": {"steps": 1, "per_tier": 5}}


def test_records_round_trip_and_reject_a_flipped_bit():
    blob = encode_result({"acc_forget": 0.7, "mia": float("nan")})
    assert decode_result(blob)["acc_forget"] == 0.7
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x04
        try:
            value = decode_result(bytes(flipped))
        except (CorruptRecord, UnicodeDecodeError, ValueError):
            continue
        assert value == decode_result(blob) or value["acc_forget"] == 0.7, i  # only whitespace-like flips load
    assert decode_result(encode_result(Scores(proxy="p", path="scores/p-0.parquet", seconds=1.0))).proxy == "p"


def _final_rum_record(run_dir: Path) -> Path:
    """The cache record holding the evaluation of the final RUM row (the one whose acc_forget is printed)."""
    steps = pd.read_parquet(run_dir / "steps.parquet")
    row = steps[(steps["strategy"] == "rum") & steps["final"]].iloc[0]
    for path in sorted((run_dir / "cache").iterdir()):
        value = check_record(path.read_bytes(), run_dir)
        if isinstance(value, dict) and value.get("acc_forget") == row["acc_forget"] and \
                value.get("acc_retain") == row["acc_retain"] and value.get("acc_test") == row["acc_test"]:
            return path
    raise AssertionError("no evaluation record found")


def _flip_a_digit(record: Path, marker: str) -> None:
    """Change one digit after `marker` in a record's body, leaving its sha256 as it was."""
    data = json.loads(record.read_bytes())
    outer = json.loads(data["result"])
    changed = outer["body"].replace(marker + "0.", marker + "1.", 1)
    assert changed != outer["body"]
    data["result"] = json.dumps({**outer, "body": changed})
    record.write_text(json.dumps(data))
    with pytest.raises(CorruptRecord):
        check_record(record.read_bytes(), record.parent.parent)


def _chain_records(run_dir: Path) -> list[Path]:
    """The cache records of the chain tasks (one per (seed, proxy) chain)."""
    return [p for p in sorted((run_dir / "cache").iterdir())
            if json.loads(json.loads(json.loads(p.read_bytes())["result"])["body"])["kind"] == "ChainRecord"]


def test_a_flipped_bit_in_an_evaluation_record_is_recomputed_not_published(prefect_api, tmp_path, one_step):
    run_dir, _ = run_experiment(one_step, tmp_path)
    before = pd.read_parquet(run_dir / "steps.parquet")
    _flip_a_digit(_final_rum_record(run_dir), '"acc_forget": ')
    # the chain's own record (checked as a whole) serves the step's rows: the damaged number is not read
    again, flow_id = run_experiment(one_step, tmp_path)
    assert dict(task_states(flow_id))["chain s0/confidence"] == "Cached"
    pd.testing.assert_frame_equal(comparable(pd.read_parquet(again / "steps.parquet")), comparable(before))
    # a damaged chain record is refused: the chain runs, and there the damaged evaluation is refused too
    (chain,) = _chain_records(run_dir)
    _flip_a_digit(chain, '"acc_forget": ')
    again, flow_id = run_experiment(one_step, tmp_path)
    states = task_states(flow_id)
    assert dict(states)["chain s0/confidence"] == "Completed"
    assert [name for name, state in states if state == "Completed" and name.startswith("evaluate")] == [
        "evaluate s0/confidence/step1/rum-high/neggrad_plus"], states
    pd.testing.assert_frame_equal(comparable(pd.read_parquet(again / "steps.parquet")), comparable(before))


class Boom:
    """Unpickling this writes a file: proof that a record would have executed code."""

    def __reduce__(self):
        return (Path.write_text, (Path(__file__).parent / ".planted-ran", "ran"))


def test_a_planted_pickle_record_is_never_unpickled(prefect_api, tmp_path, one_step):
    run_dir, _ = run_experiment(one_step, tmp_path)
    before = pd.read_parquet(run_dir / "steps.parquet")
    marker = Path(__file__).parent / ".planted-ran"
    marker.unlink(missing_ok=True)
    for path in (run_dir / "cache").iterdir():  # every record now claims to be a pickle of Boom
        data = json.loads(path.read_bytes())
        data["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}
        data["result"] = base64.b64encode(pickle.dumps(Boom())).decode()
        path.write_text(json.dumps(data))
    again, flow_id = run_experiment(one_step, tmp_path)
    assert not marker.exists(), "a planted record ran code"
    pd.testing.assert_frame_equal(comparable(pd.read_parquet(again / "steps.parquet")), comparable(before))
    states = task_states(flow_id)
    assert all(state == "Completed" for _, state in states)  # nothing was served from a planted record
    safe = [p for p in (run_dir / "cache").iterdir()
            if json.loads(p.read_bytes())["metadata"]["serializer"]["type"] == "rumflow-json"]
    assert len(safe) >= len(states)  # the recomputed tasks wrote safe records


def test_a_flipped_bit_in_scores_or_a_checkpoint_is_recomputed(prefect_api, tmp_path, one_step):
    run_dir, _ = run_experiment(one_step, tmp_path)
    before = pd.read_parquet(run_dir / "steps.parquet")
    scores = next((run_dir / "scores").glob("confidence-*.parquet"))
    frame = pd.read_parquet(scores)
    frame.loc[frame.index[0], "score"] = frame["score"].iloc[0] + 0.25  # other values, same file name
    frame.to_parquet(scores, index=False)
    ckpt = run_dir / "checkpoints" / f"{before['checkpoint'].iloc[-1]}.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) - 64] ^= 0x01  # same size, other bytes
    ckpt.write_bytes(bytes(data))
    again, flow_id = run_experiment(one_step, tmp_path)
    states = dict(task_states(flow_id))
    assert states["proxy s0/confidence"] == "Completed"
    pd.testing.assert_frame_equal(comparable(pd.read_parquet(again / "steps.parquet")), comparable(before))


def test_a_finished_run_verifies_in_a_fresh_process_also_after_rumflow_report(prefect_api, tmp_path, one_step):
    """Every record type a run writes (chain and report records included) is known to `rumflow verify`,
    and rebuilding the report leaves the report task's record pointing at what is there."""
    import subprocess
    import sys

    run_dir, _ = run_experiment(one_step, tmp_path)
    for command in ("verify", "report", "verify"):
        done = subprocess.run([sys.executable, "-m", "rumflow.cli", command, str(run_dir)], capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    assert "intact" in done.stdout


def test_a_chain_that_fails_leaves_only_rumflow_records_in_the_cache(prefect_api, tmp_path, one_step):
    """A failing step subflow writes its error (Prefect always does for a failed flow run) outside the run
    folder: every file in cache/ is still a record the next run and `rumflow verify` accept."""
    from rumflow.config import validate_config
    from rumflow.flows.experiment import configured
    from rumflow.methods.registry import METHODS, register

    def explode(model, forget, retain, params, ctx):
        """Always fails (a test method)."""
        raise RuntimeError("this method always fails")

    register("explode_for_test")(explode)
    try:
        cfg = validate_config({**one_step, "vanilla": {"method": "explode_for_test"}})
        state = configured(cfg)(cfg, out=str(tmp_path), return_state=True)
    finally:
        METHODS._entries.pop("explode_for_test")
    assert state.is_failed()
    records = [p for p in (tmp_path / "tiny" / "cache").iterdir() if p.is_file()]
    assert records
    for path in records:
        check_record(path.read_bytes(), tmp_path / "tiny")  # raises on anything but a rumflow record
