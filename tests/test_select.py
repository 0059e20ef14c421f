"""Selection (issue 13): validation requests disjoint from the reported ones, the rule, the compute budget
in the trials' rows, a cached re-run, and a selected config the experiment accepts (real flow, digits)."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from apihelpers import run_experiment, task_states

from rumflow.errors import ConfigError
from rumflow.planning import TIERS, plan_step
from rumflow.selection import (RuleConfig, apply_rule, load_select_config, request_plans, rum_trials,
                               vanilla_trials)

BASE = {
    "name": "tinysel",
    "train": {"epochs": 3},
    "proxies": ["confidence"],
    "holdout": {"max_epochs": 3},
    "forget": {"steps": 2, "per_tier": 5},
    "rum": {"low": {"method": "none"}, "mid": {"method": "finetune", "epochs": 1},
            "high": {"method": "neggrad_plus", "epochs": 1}},
    "vanilla": {"method": "neggrad_plus", "epochs": 1},
    "seeds": [0],
}
MID_EPOCHS = 2
SELECT = {
    "base": BASE,
    "space": {"rum.mid": [{"method": "finetune", "epochs": MID_EPOCHS, "retain_fraction": [0.25, 1.0]}],
              "vanilla": [{"method": "neggrad_plus", "epochs": 1, "retain_fraction": 0.5}]},
    "rule": {"max_rte": 100.0},
    "validation": {"requests": 1},
}


def test_validation_requests_are_disjoint_from_every_reported_request():
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1000, 1400))
    mem = rng.random(len(ids))
    mem[::37] = np.nan  # unscored examples are never chosen, as in the experiment
    reported, validation = request_plans(ids, mem, steps=3, requests=2, per_tier=10)
    chain = []  # the experiment's own chain of plan_step calls
    for k in range(1, 4):
        chain.append(plan_step(k, ids, mem, chain[-1].forgotten if chain else [], 10))
    assert reported == chain
    shown = set(reported[-1].forgotten)
    assert len(shown) == 3 * 3 * 10
    assert [p.step for p in validation] == [4, 5]
    for plan in validation:
        assert plan.before == []  # a one-step request on the original model
        assert not shown & set(plan.mix)
        for stage in (*TIERS, "mix"):
            for policy in ("strict", "rum"):
                assert not shown & set(plan.excluded_from_retain(stage, policy))
                assert not shown & set(plan.tier(stage))
    assert not set(validation[0].mix) & set(validation[1].mix)


def _sweep(rows):
    df = pd.DataFrame(rows)
    df["index"] = range(len(df))
    df["trial"] = [f"{s}-{i}" for s, i in zip(df["strategy"], df["index"])]
    df["rte_step_max"] = df["rte_step"]
    return df


def test_rule_honours_the_cap_breaks_ties_by_cost_and_may_pick_nothing():
    sweep = _sweep([
        {"strategy": "rum", "tow": 0.99, "tow_mia": 0.99, "rte_step": 0.30, "examples": 10},   # best, too slow
        {"strategy": "rum", "tow": 0.90, "tow_mia": 0.96, "rte_step": 0.04, "examples": 50},   # tied (mean .93)
        {"strategy": "rum", "tow": 0.96, "tow_mia": 0.90, "rte_step": 0.02, "examples": 90},   # tied, cheaper
        {"strategy": "rum", "tow": np.nan, "tow_mia": np.nan, "rte_step": np.nan, "examples": 0},  # failed
        {"strategy": "vanilla", "tow": 0.97, "tow_mia": 0.97, "rte_step": 0.06, "examples": 5},
    ])
    out = apply_rule(sweep, RuleConfig(max_rte=0.05))
    assert out.loc[out["selected"], "trial"].tolist() == ["rum-2"]
    assert out["meets_cap"].tolist() == [False, True, True, False, False]
    worst = apply_rule(sweep, RuleConfig(max_rte=0.05, objective="min_tow_towmia"))
    assert worst.loc[worst["selected"], "trial"].tolist() == ["rum-2"]  # min .90 both: cheaper wins
    assert worst.loc[1, "objective"] == pytest.approx(0.90)
    loose = apply_rule(sweep, RuleConfig(max_rte=1.0))
    assert loose.loc[loose["selected"], "trial"].tolist() == ["rum-0", "vanilla-4"]
    tight = apply_rule(sweep, RuleConfig(max_rte=0.001))
    assert not tight["selected"].any()
    tolerant = apply_rule(sweep, RuleConfig(max_rte=1.0, tolerance=0.1))
    assert tolerant.loc[tolerant["selected"], "trial"].tolist() == ["rum-2", "vanilla-4"]


def test_select_config_grid_and_bad_input():
    cfg = load_select_config(copy.deepcopy(SELECT))
    trials = rum_trials(cfg)
    assert [t.settings()["mid"]["retain_fraction"] for t in trials] == [0.25, 1.0]
    assert all(t.settings()["high"] == {"method": "neggrad_plus", **cfg.base.rum.high.params.model_dump(mode="json")}
               for t in trials)  # the tiers left out of the space keep the base's setting
    assert len(vanilla_trials(cfg)) == 1
    big = copy.deepcopy(SELECT)
    big["space"]["rum.high"] = [{"method": "neggrad_plus", "lr": [0.01, 0.03], "alpha": [0.9, 0.95]},
                                {"method": "scrub", "retain_fraction": 0.1}]
    assert len(rum_trials(load_select_config(big))) == 2 * (4 + 1)
    bad = [({"space": {"rum.mid": [{"method": "finetune", "lrr": [0.1]}]}}, "has no hyperparameter 'lrr'"),
           ({"space": {"rum.top": [{"method": "finetune"}]}}, "rum.top"),
           ({"sampler": "optuna"}, "optuna"),
           ({"rule": {"max_rte": 0}}, "max_rte"),
           ({"base": {**BASE, "proxies": ["holdout_retraining"], "recompute": ["holdout_retraining"]}},
            "remove recompute"),
           ({"space": {"rum.mid": [{"method": "finetune", "lr": [0.1, 0.2, 0.3], "epochs": [1, 2, 3]}]},
             "max_trials": 4}, "max_trials=4"),
           ({"base": {**BASE, "train": {"epochz": 3}}}, "epochz")]
    for change, words in bad:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("=", "=")) as info:
            load_select_config({**copy.deepcopy(SELECT), **change})
        message = str(info.value)
        assert "\n" not in message and message.endswith(".") and message.startswith(("select config", "unknown"))


def test_base_config_path_and_overrides(tmp_path):
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(BASE))
    body = {k: v for k, v in SELECT.items() if k != "base"}
    (tmp_path / "select.yaml").write_text(yaml.safe_dump({**body, "base_config": "experiment.yaml"}))
    cfg = load_select_config(tmp_path / "select.yaml", ["base.train.epochs=2", "rule.max_rte=0.1"])
    assert cfg.base.train.epochs == 2 and cfg.rule.max_rte == 0.1 and cfg.base.forget.steps == 2
    assert cfg.folder == "tinysel-select" and cfg.seeds == [0] and cfg.proxies == ["confidence"]
    assert load_select_config(tmp_path / "select.yaml").digest() != cfg.digest()
    with pytest.raises(ConfigError, match="select config base: .*'train.lrr'"):
        load_select_config(tmp_path / "select.yaml", ["base.train.lrr=2"])


def test_cli_refuses_bad_input_with_one_sentence_and_exit_2(tmp_path, capsys):
    from rumflow.cli import main

    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump({**SELECT, "rule": {"max_rte": "lots"}}))
    assert main(["select", "--config", str(path), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rule.max_rte" in err[0]
    path.write_text(yaml.safe_dump(SELECT))
    assert main(["select", "--config", str(path), "--set", "validation.requests=500", "--out",
                 str(tmp_path / "runs")]) == 2
    assert "validation requests" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_selection_flow_split_budget_cache_and_selected_config(prefect_api, tmp_path, capsys):
    from rumflow.config import ExperimentConfig
    from rumflow.flows.select import configured
    from rumflow.methods.registry import get_method, retain_count
    from rumflow.runtime import dataset_on

    body = copy.deepcopy(SELECT)
    body["space"]["vanilla"].append({"method": "neggrad", "lr": 1000.0, "epochs": 3})  # diverges: a finding
    cfg = load_select_config(body)
    state = configured(cfg)(cfg, out=str(tmp_path), return_state=True)
    assert state.is_completed(), state
    sel_dir = tmp_path / "tinysel-select"
    first = task_states(state.state_details.flow_run_id)
    failed = [n for n, s in first if s not in ("Completed", "Cached")]
    assert sorted(s for _, s in first if s not in ("Completed", "Cached")) == ["Failed", "NotReady"]
    assert "unlearn s0/confidence/val1/vanilla-mix/neggrad(lr=1000.0, epochs=3)" in failed
    names = [n for n, _ in first]
    assert len(set(names)) == len(names), "every task run says which trial and request it is"

    sweep = pd.read_parquet(sel_dir / "sweep.parquet")
    trials = pd.read_parquet(sel_dir / "trials.parquet")
    assert len(sweep) == 4 and set(sweep["strategy"]) == {"rum", "vanilla"}
    diverged = sweep.set_index("trial").loc["vanilla-1"]
    assert "DivergenceError" in diverged["error"] and not diverged["selected"] and not diverged["meets_cap"]
    assert "Trial vanilla-1 failed: DivergenceError" in (sel_dir / "summary.md").read_text()
    sweep_ok = sweep[sweep["error"].isna()]
    for col in ("tow", "tow_mia", "rte_step", "seconds", "examples", "meets_cap", "selected", "settings_json",
                "mid_method", "mid_params", "mix_method"):
        assert col in sweep.columns, col
    assert sweep_ok["tow_mia"].between(0, 1).all()
    assert sweep_ok["tow"].between(0, 1).all() and (sweep_ok["rte_step"] > 0).all() and len(sweep_ok) == 3
    assert sweep.groupby("strategy")["selected"].sum().tolist() == [1, 1]
    assert (sel_dir / "figures" / "frontier.png").stat().st_size > 0
    assert (sel_dir / "manifest.json").exists() and not (sel_dir / "INCOMPLETE").exists()

    # budget: the mid tier's examples are its epochs x the budgeted share of its retain set
    n_train = len(dataset_on(cfg.base.data, "cpu").train)
    n_retain = n_train - 3 * BASE["forget"]["per_tier"]  # a one-step request: only its tiers are left out
    rum = trials[trials["strategy"] == "rum"].sort_values("index")
    for fraction, got in zip((0.25, 1.0), rum["mid_examples"]):
        p = get_method("finetune").params(epochs=MID_EPOCHS, retain_fraction=fraction)
        assert got == MID_EPOCHS * retain_count(n_retain, p)
    assert rum["mid_examples"].iloc[0] < rum["mid_examples"].iloc[1]
    assert (rum["examples"] == rum[["low_examples", "mid_examples", "high_examples"]].sum(axis=1)).all()

    # the split: no trial's forget set or left-out retain ids touch a reported request
    req = pd.read_parquet(sel_dir / "requests.parquet")
    shown = set(req.loc[req["role"] == "reported", "example_id"])
    held = set(req.loc[req["role"] == "validation", "example_id"])
    assert len(shown) == 2 * 15 and len(held) == 15 and not shown & held
    scores = pd.read_parquet(next((sel_dir / "scores").glob("confidence-*.parquet")))
    ids = dataset_on(cfg.base.data, "cpu").train.ids()
    from rumflow.proxies.registry import PROXIES, memorization_of

    raw = scores.set_index("example_id").loc[ids, "score"].to_numpy()
    reported, validation = request_plans(ids, memorization_of("confidence", raw), 2, 1, 5,
                                         PROXIES["confidence"].mid_target)
    assert set(reported[-1].forgotten) == shown and set(validation[0].mix) == held

    # selected.yaml is an experiment config; the report runs on the reported requests only
    selected = yaml.safe_load((sel_dir / "selected.yaml").read_text())
    exp = ExperimentConfig.model_validate(selected)
    pick = sweep[sweep["selected"] & (sweep["strategy"] == "rum")].iloc[0]
    assert exp.rum.mid.model_dump(mode="json")["params"] == json.loads(pick["mid_params"])
    assert exp.vanilla.params.retain_fraction == 0.5
    from rumflow.service import ServiceConfig

    assert ServiceConfig.model_validate({"rum": selected["rum"]}).rum == exp.rum  # the service takes the block
    run_dir, _ = run_experiment(selected, tmp_path)
    marks = pd.read_parquet(run_dir / "examples.parquet")
    forgotten = set(marks.loc[marks["forget_step_confidence"].notna(), "example_id"])
    assert forgotten == shown and not forgotten & held

    # a re-run serves every task from the cache; a cap nothing meets selects nothing, in one sentence
    again = configured(cfg)(cfg, out=str(tmp_path), return_state=True)
    second = task_states(again.state_details.flow_run_id)
    assert len(second) == len(first)
    assert sorted(s for _, s in second if s != "Cached") == ["Failed", "NotReady"], second  # failures are not cached
    pd.testing.assert_frame_equal(pd.read_parquet(sel_dir / "sweep.parquet"), sweep)
    from rumflow.cli import main

    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(SELECT))
    assert main(["select", "--config", str(path), "--out", str(tmp_path), "--set", "rule.max_rte=1e-9"]) == 0
    printed = capsys.readouterr().out
    assert "| strategy | trial |" in printed and "no rum trial meets the cap" in printed
    assert not (sel_dir / "selected.yaml").exists()
    assert "No rum trial meets the cap" in (sel_dir / "summary.md").read_text()
