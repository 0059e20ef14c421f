"""The real flow on a tiny experiment, against a real Prefect API (the test harness): caching across
runs, partial recomputation, resume after SIGKILL, and reproducibility."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import yaml
from apihelpers import read_artifacts, run_experiment, task_states

from rumflow.artifacts.runfolder import flow_run_tree
from rumflow.flows.experiment import planned_tasks


TIME_COLUMNS = {"seconds", "seconds_step", "retrain_seconds", "rte", "rte_step", "efficient", "host",
                # provenance: a process started while tests/test_caching.py edits a method file (tests run in
                # parallel) digests that edit; the results it pins are the same
                "code_sha"}


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """The steps table without wall times (which differ between runs by nature)."""
    keys = ["seed", "proxy", "strategy", "step", "stage"]
    return df.drop(columns=[c for c in df.columns if c in TIME_COLUMNS]).sort_values(keys, ignore_index=True)


def check_run_graph(flow_run_id, cfg) -> None:
    """The UI's units, read back from the API: one subflow per (seed, proxy) chain under the run, one per
    step under its chain, each step's tasks in its step's flow run, and the edges between them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    from rumflow.artifacts.runfolder import flow_run_tree

    def children(client, parent) -> dict:
        flt = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))
        return {r.name: r for r in client.read_flow_runs(flow_run_filter=flt)}

    def tasks(client, run_id) -> dict:
        return {t.name: t for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200)}

    with get_client(sync_client=True) as client:
        chains = children(client, flow_run_id)
        assert set(chains) == {f"s{seed}/{p}" for seed in cfg.seeds for p in cfg.proxies}
        top = tasks(client, flow_run_id)
        for name, chain in chains.items():
            driver = top[f"chain {name}"]  # its inputs are the chain's original model and proxy scores
            inputs = {i.id for refs in driver.task_inputs.values() for i in refs}
            seed, proxy = name[1:].split("/")
            assert {top[f"train s{seed}/original"].id, top[f"proxy {name}"].id} <= inputs
            steps = children(client, chain.id)
            assert set(steps) == {f"{name}/step{k}" for k in range(1, cfg.forget.steps + 1)}
            calls = tasks(client, chain.id)  # the task runs that stand for the step subflows in the chain
            by_run = {c.id: c for c in calls.values()}
            for k in range(1, cfg.forget.steps + 1):
                step = steps[f"{name}/step{k}"]
                inside = tasks(client, step.id)
                assert f"plan {name}/step{k}" in inside and f"train {name}/step{k}/retrain" in inside
                assert all(t.startswith(("plan", "train", "unlearn", "evaluate", "prepare", "proxy")) and
                           f"{name}/step{k}" in t for t in inside), inside
                call = by_run[step.parent_task_run_id]
                if k > 1:  # drawn from the previous step, whose models this one starts from
                    before = steps[f"{name}/step{k - 1}"]
                    assert {i.id for refs in call.task_inputs.values() for i in refs} & {before.id,
                                                                                          before.parent_task_run_id}
        every = len(client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=flow_run_tree(client, flow_run_id))), limit=200))
    n_chains = len(cfg.seeds) * len(cfg.proxies)
    # every planned task, plus per chain: its driver, the chain's call and its steps' calls
    assert every == planned_tasks(cfg) + n_chains * (2 + cfg.forget.steps)


def step_lines(caplog) -> list[str]:
    """The steps' log lines, as the flow-run logger of each step subflow wrote them (console and API)."""
    return [r.getMessage() for r in caplog.records if r.name == "prefect.flow_runs" and "| step " in r.getMessage()]


def test_two_step_experiment_then_cached_rerun_then_partial_recompute(prefect_api, tmp_path, tiny_config, caplog):
    from prefect.client.orchestration import get_client

    caplog.set_level("INFO")
    run_dir, first_id = run_experiment(tiny_config, tmp_path)
    lines = step_lines(caplog)
    assert len(lines) == 4 and any(line.startswith("seed 0 | confidence | step 2: ToW rum") for line in lines)
    assert not any(line.endswith("cached") for line in lines)
    caplog.clear()
    steps = pd.read_parquet(run_dir / "steps.parquet")
    # per proxy: original + 2 steps x (retrain + 3 RUM sub-steps + vanilla)
    assert len(steps) == 2 * (1 + 2 * 5)
    for col in ["run", "seed", "proxy", "strategy", "step", "stage", "method", "code_sha", "examples", "params", "checkpoint", "seconds",
                "acc_retain", "acc_forget", "acc_val", "acc_test", "tow", "tow_mia", "mia", "config_sha"]:
        assert col in steps.columns, col
    assert set(steps["strategy"]) == {"original", "retrain", "rum", "vanilla"}
    assert (steps.loc[steps["strategy"] == "retrain", "tow"] == 1.0).all()
    final_rum = steps[(steps["strategy"] == "rum") & steps["final"]]
    assert list(final_rum["stage"].unique()) == ["high"]
    assert "tier" not in steps.columns  # one column says which sub-step a row is
    examples = pd.read_parquet(run_dir / "examples.parquet")
    assert len(examples) == 1257 and examples["example_id"].is_unique
    assert {"confidence", "holdout_retraining", "forget_step_confidence", "forget_tier_confidence"} <= set(examples)
    assert (examples["forget_step_confidence"].notna().sum()) == 2 * 3 * 5
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["forget"]["steps"] == 2
    from rumflow.config import validate_config

    key = f"tiny-{validate_config(tiny_config).digest()[:8]}"
    progress = read_artifacts(f"{key}-progress")
    assert progress and progress[0].data == 100.0  # every chain step advanced it
    assert progress[0].description == "{0} of {0} done".format(planned_tasks(validate_config(tiny_config)))
    check_run_graph(first_id, validate_config(tiny_config))
    for proxy in ("confidence", "holdout-retraining"):
        for k in (1, 2):
            table = read_artifacts(f"{key}-s0-{proxy}-step{k}")[0]
            rows = json.loads(table.data) if isinstance(table.data, str) else table.data
            assert {r["strategy"] for r in rows} == {"retrain", "rum", "vanilla"} | ({"original"} if k == 1 else set())
            assert list(rows[0])[:4] == ["strategy", "stage", "method", "acc_forget"]  # metrics first
            assert all(r["tow"] is None or r["tow"] == round(r["tow"], 3) for r in rows)
    summary = read_artifacts(f"{key}-summary")[0]
    assert summary.type == "markdown" and "| confidence | rum |" in summary.data

    first_states = task_states(first_id)
    assert first_states and all(state in ("Completed", "Cached") for _, state in first_states)
    assert any(name.startswith("train") and state == "Completed" for name, state in first_states)
    names = [name for name, _ in first_states]
    assert len(set(names)) == len(names), "every task run says which seed, proxy, step and stage it is"
    assert "unlearn s0/confidence/step2/rum-high/neggrad_plus" in names

    again_dir, second_id = run_experiment(tiny_config, tmp_path)
    assert len(step_lines(caplog)) == 4 and all(line.endswith("| cached") for line in step_lines(caplog))
    second_states = task_states(second_id)
    # the sources, and one record per chain: a chain whose key still holds runs none of its step subflows
    sources_and_chains = {name for name in names if name.startswith("chain ") or "/step" not in name}
    assert sorted(name for name, _ in second_states) == sorted(sources_and_chains), second_states
    assert {f"chain s0/{p}" for p in tiny_config["proxies"]} <= sources_and_chains
    assert all(state == "Cached" for _, state in second_states), second_states
    with get_client(sync_client=True) as client:
        assert flow_run_tree(client, second_id) == [second_id]  # no chain or step subflow run
    assert read_artifacts(f"{key}-progress")[0].data == 100.0  # a cached chain counts all its tasks
    # a cached chain's step tables stay those of the run that computed them (same keys)
    assert len(read_artifacts(f"{key}-s0-confidence-step2")) == 1
    assert dict(second_states)["report tiny"] == "Cached"  # the same tables: the report is not drawn again
    pd.testing.assert_frame_equal(pd.read_parquet(again_dir / "steps.parquet"), steps)

    changed = {**tiny_config, "rum": {**tiny_config["rum"], "high": {"method": "finetune", "epochs": 1}}}
    _, third_id = run_experiment(changed, tmp_path)
    third = task_states(third_id)
    recomputed = {name for name, state in third if state != "Cached"}
    assert recomputed, "changing the high tier's method must recompute something"
    assert not any(name.startswith(("train", "proxy", "plan")) for name in recomputed), recomputed
    assert "unlearn s0/confidence/step1/rum-high/finetune" in recomputed
    assert not any(name.startswith("unlearn") and "vanilla" in name for name in recomputed), recomputed


def test_resume_after_sigkill_gives_the_same_rows(prefect_api, tmp_path, tiny_config):
    """Kill a CLI run mid-way, start it again: finished tasks come back Cached and the final rows equal
    those of an uninterrupted run in another process (so the run is also reproducible)."""
    from prefect.settings import PREFECT_API_URL

    config = {**tiny_config, "forget": {"steps": 3, "per_tier": 5}, "proxies": ["confidence"]}
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "killed"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "rumflow.cli", "run", "--config", str(config_path), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoints = out / "tiny" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(checkpoints.glob("*.pt"))) < 6:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(checkpoints.glob("*.pt")))
    assert done_before >= 6, proc.stdout.read().decode()[-2000:]
    assert not (out / "tiny" / "steps.parquet").exists(), "the run finished before it was killed"

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert not list((out / "tiny").rglob("*.tmp")), "a half-written file was left behind"

    baseline_dir, _ = run_experiment(config, tmp_path / "uninterrupted")
    pd.testing.assert_frame_equal(comparable(pd.read_parquet(out / "tiny" / "steps.parquet")),
                                  comparable(pd.read_parquet(baseline_dir / "steps.parquet")))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "tiny" / "examples.parquet"),
                                  pd.read_parquet(baseline_dir / "examples.parquet"))


def test_missing_checkpoint_behind_a_cache_hit_is_recomputed(prefect_api, tmp_path, tiny_config):
    config = {**tiny_config, "proxies": ["confidence"], "forget": {"steps": 1, "per_tier": 5}}
    run_dir, _ = run_experiment(config, tmp_path)
    before = pd.read_parquet(run_dir / "steps.parquet")
    for path in (run_dir / "checkpoints").glob("*.pt"):
        path.unlink()
    run_dir, _ = run_experiment(config, tmp_path)
    assert len(list((run_dir / "checkpoints").glob("*.pt"))) > 0
    pd.testing.assert_frame_equal(comparable(pd.read_parquet(run_dir / "steps.parquet")), comparable(before))


def test_adding_a_proxy_later_reuses_the_first(prefect_api, tmp_path, tiny_config):
    one = {**tiny_config, "proxies": ["confidence"], "forget": {"steps": 1, "per_tier": 5}}
    run_experiment(one, tmp_path)
    _, second = run_experiment({**one, "proxies": ["confidence", "max_confidence"]}, tmp_path)
    runs = task_states(second)
    states = dict(runs)  # these names occur once per run
    recomputed = {name for name, state in runs if state != "Cached"}
    assert states["proxy s0/confidence"] == "Cached" and states["train s0/original"] == "Cached"
    assert "proxy s0/max_confidence" in recomputed  # and the new proxy's own chain and references
