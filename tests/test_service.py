"""The service's pure parts: request parsing and every refusal, tiers of a given request, the gates and
the request commands. No Prefect. The store (SQLite and PostgreSQL) is tested in test_ledger_store.py."""
import numpy as np
import pytest

from rumflow.artifacts.ledger import LEDGER_FILE, Ledger
from rumflow.errors import ConfigError
from rumflow.planning import partition_request
from rumflow.service import (GateConfig, apply_gates, derived_figures, forget_p_value, gate_failure, parse_id_file,
                             parse_id_list, validate_request, validate_service_config)

TRAIN = np.arange(0, 100, 2)  # even ids are training examples


# -- parsing -----------------------------------------------------------------------------------------

def test_id_list_and_file_parse(tmp_path):
    assert parse_id_list("12,907, 3311") == [12, 907, 3311]
    path = tmp_path / "ids.txt"
    path.write_text("12\n\n# a comment\n907  # trailing\n3311\n")
    assert parse_id_file(path) == [12, 907, 3311]


@pytest.mark.parametrize("text, fragment", [
    ("12,x,3", "--ids: 'x' is not an integer example id; separate ids with commas"),
    ("12,-3", "--ids: '-3' is not an integer example id"),
    ("1.5", "'1.5' is not an integer example id"),
])
def test_bad_id_lists_are_refused_with_one_sentence(text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")) as err:
        parse_id_list(text)
    assert str(err.value).replace("e.g. ", "").count(". ") == 0 and str(err.value).endswith(".")


def test_bad_id_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="ids file '.*nope.txt' does not exist; check the path given to --file"):
        parse_id_file(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("4\n8\nabc\n")
    with pytest.raises(ConfigError, match="line 3: 'abc' is not an integer example id; write one integer id a line"):
        parse_id_file(bad)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match="is not a text file"):
        parse_id_file(binary)


# -- validation ------------------------------------------------------------------------------------

def test_a_good_request_is_sorted():
    assert validate_request([8, 2, 4], TRAIN, {}, {}) == [2, 4, 8]


@pytest.mark.parametrize("ids, forgotten, pending, fragment", [
    ([], {}, {}, "the request names no example ids; give at least one with --ids or --file."),
    ([2, 4, 2], {}, {}, "the request lists id 2 more than once; list each id once."),
    ([2, 3], {}, {}, "1 of the ids is not in the training set (3); only training examples can be forgotten"),
    ([3, 5, 2], {}, {}, "2 of the ids are not in the training set (3, 5)"),
    ([2, 4], {4: "r1"}, {}, "1 of the ids was already forgotten (4, by request 'r1'); remove them from the request."),
    ([2, 6], {}, {6: "r7", 2: "r7"}, "2 of the ids are already queued (2, 6, in request 'r7')"),
    (list(range(0, 96, 2)), {96: "r1"}, {98: "r2"}, "the request would leave 0 training examples to retain"),
])
def test_every_refusal_sentence(ids, forgotten, pending, fragment):
    with pytest.raises(ConfigError) as err:
        validate_request(ids, TRAIN, forgotten, pending)
    assert fragment in str(err.value)


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="proxy 'memorization' cannot tier service requests"):
        validate_service_config({"proxy": "memorization"})
    with pytest.raises(ConfigError, match="version0.run is not set"):
        validate_service_config({"version0": {"source": "experiment"}})
    with pytest.raises(ConfigError, match="needs version0.source: train"):
        validate_service_config({"proxy": "confidence", "version0": {"source": "experiment", "run": "x"}})
    with pytest.raises(ConfigError, match="unknown config key 'gates.max_foo'"):
        validate_service_config({"gates": {"max_foo": 1}})
    with pytest.raises(ConfigError, match="gates.min_mia needs the attack"):
        validate_service_config({"gates": {"min_mia": 0.5}, "evaluate": {"mia": False}})


# -- tiers of a given request ----------------------------------------------------------------------

def test_partition_request_uses_the_pool_quantiles():
    ids = np.arange(30)
    mem = np.arange(30, dtype=float)  # id i has memorization i
    tiers = partition_request([29], ids, mem)
    assert tiers == {"low": [], "mid": [], "high": [29]}  # one highly memorized example lands in high
    tiers = partition_request([0, 5, 12, 15, 25, 28], ids, mem)
    assert tiers == {"low": [0, 5], "mid": [12, 15], "high": [25, 28]}
    mem[7] = np.nan
    assert partition_request([7, 1], ids, mem)["high"] == [7]  # unscored: the cautious tier
    with pytest.raises(ValueError, match="not in the scored pool"):
        partition_request([99], ids, mem)


def test_partition_request_is_disjoint_and_complete():
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10_000, 500, replace=False))
    mem = rng.normal(size=500)
    request = rng.choice(ids, 60, replace=False)
    tiers = partition_request(request, ids, mem)
    parts = [set(tiers[t]) for t in ("low", "mid", "high")]
    assert sum(len(p) for p in parts) == 60 and set().union(*parts) == set(request.tolist())
    by_id = dict(zip(ids.tolist(), mem))
    assert max(by_id[i] for i in parts[0]) < min(by_id[i] for i in parts[2])


# -- gates -----------------------------------------------------------------------------------------

def test_forget_p_value_is_two_sided():
    assert forget_p_value(10, 10, 0.5) == pytest.approx(2 * 0.5 ** 10)  # symmetric: both tails
    assert forget_p_value(0, 10, 0.9) == pytest.approx(0.1 ** 10)  # none correct: only that outcome is as rare
    assert forget_p_value(9, 10, 0.9) == pytest.approx(1.0)  # the most likely outcome
    assert forget_p_value(0, 0, 0.9) == 1.0
    assert forget_p_value(3, 10, 0.5) == pytest.approx(forget_p_value(7, 10, 0.5))


def _figures(**over):
    new = {"acc_forget": 0.9, "acc_test": 0.9, "acc_retain": 0.95, "mia": 0.5}
    prev = {"acc_forget": 1.0, "acc_test": 0.92, "acc_retain": 0.97}
    new.update(over)
    return {**new, **derived_figures(new, prev, 20)}


def test_gates_pass_and_reject():
    assert all(v["passed"] for v in apply_gates(_figures(), GateConfig()))
    assert gate_failure(apply_gates(_figures(), GateConfig())) is None
    # every forgotten example still correct while test accuracy is 0.7
    verdicts = apply_gates(_figures(acc_forget=1.0, acc_test=0.7), GateConfig())
    failed = {v["gate"] for v in verdicts if not v["passed"]}
    assert failed == {"forget_alpha", "max_test_drop"}
    sentence = gate_failure(verdicts)
    assert sentence.startswith("the new version missed forget_alpha (forget_p = ") and "kept but not promoted" in sentence
    strict = GateConfig(max_forget_gap=0.0, min_mia=0.6, max_retain_drop=0.0, forget_alpha=None, max_test_drop=None)
    assert {v["gate"] for v in apply_gates(_figures(acc_forget=0.85), strict) if not v["passed"]} == {
        "max_forget_gap", "min_mia", "max_retain_drop"}
    assert [v["gate"] for v in apply_gates(_figures(), GateConfig(forget_alpha=None, max_retain_drop=None,
                                                                  max_test_drop=None))] == []
    # an unmeasured figure fails its gate rather than passing silently
    verdicts = {v["gate"]: v for v in apply_gates(_figures(mia=float("nan")), GateConfig(min_mia=0.1))}
    assert not verdicts["min_mia"]["passed"] and verdicts["max_test_drop"]["passed"]


@pytest.mark.parametrize("gates", [GateConfig(), GateConfig(forget_alpha=None, max_forget_gap=0.1)],
                         ids=["binomial", "band"])
def test_the_forget_gates_are_two_sided(gates):
    """A retrain scores unseen examples like held-out ones: far above held-out accuracy the version forgot
    too little, far below it forgot too much (a membership signal too); near it, it passes."""
    only = GateConfig(forget_alpha=gates.forget_alpha, max_forget_gap=gates.max_forget_gap, max_retain_drop=None,
                      max_test_drop=None)
    gate = "forget_alpha" if gates.forget_alpha is not None else "max_forget_gap"
    outcomes = {}
    for name, acc_forget in (("too little", 1.0), ("in the band", 0.85), ("too much", 0.4)):
        (verdict,) = apply_gates(_figures(acc_forget=acc_forget, acc_test=0.8), only)  # 20 forgotten examples
        assert verdict["gate"] == gate
        outcomes[name] = verdict
    assert not outcomes["too little"]["passed"] and outcomes["too little"]["side"] == "above"
    assert not outcomes["too much"]["passed"] and outcomes["too much"]["side"] == "below"
    assert outcomes["in the band"]["passed"]
    assert "it forgets too little" in gate_failure([outcomes["too little"]])
    assert "it forgets too much, itself a membership signal" in gate_failure([outcomes["too much"]])


# -- the request commands (the store itself: tests/test_ledger_store.py) -----------------------------

def test_request_commands_from_the_cli(tmp_path, capsys, monkeypatch):
    from rumflow.cli import main

    root = tmp_path / "services" / "t"
    root.mkdir(parents=True)
    (root / "service.yaml").write_text("name: t\n")
    np.save(root / "train_ids.npy", TRAIN)
    led = Ledger.create(root / LEDGER_FILE, "t", "x")
    led.set_version0("a" * 64, "test")
    led.close()
    svc = ["--service", str(root)]
    assert main(["request", "add", *svc, "--ids", "2,4", "--note", "ticket 1"]) == 0
    assert "request r1 queued: 2 examples" in capsys.readouterr().out
    ids = tmp_path / "ids.txt"
    ids.write_text("6\n8\n")
    monkeypatch.chdir(tmp_path)  # the only service under ./services is found without --service
    assert main(["request", "add", "--file", str(ids), "--id", "f-1"]) == 0
    capsys.readouterr()
    assert main(["request", "add", *svc, "--ids", "3"]) == 2
    assert capsys.readouterr().err == ("rumflow: error: 1 of the ids is not in the training set (3); only training "
                                       "examples can be forgotten: remove them from the request.\n")
    assert main(["request", "add", *svc, "--ids", "10", "--file", str(ids)]) == 2
    assert "(one of them)" in capsys.readouterr().err
    assert main(["request", "withdraw", *svc, "f-1", "--reason", "duplicate ticket"]) == 0
    assert main(["request", "list", *svc]) == 0
    out = capsys.readouterr().out
    assert "r1           queued" in out and "ticket 1" in out and "f-1          rejected" in out
    assert "duplicate ticket" in out and "production model: v0" in out
    assert main(["request", "list", "--service", str(tmp_path)]) == 2
    assert "is not a service folder" in capsys.readouterr().err
