"""Configuration: loading, overrides, and the one-sentence errors of the CLI (before any work)."""
import json

import pytest
import yaml

from rumflow.cli import main
from rumflow.config import ExperimentConfig, dump_config, load_config
from rumflow.errors import ConfigError


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config()
    from rumflow.methods.registry import dataset_settings

    assert cfg.rum.high.method == "neggrad_plus" and cfg.rum.high.params.alpha == dataset_settings("digits")["experiment"]["high"]["alpha"]
    assert cfg.rum.high.params.momentum == 0.9  # unspecified hyperparameters keep the method's defaults
    assert cfg.proxies == ["confidence", "max_confidence", "entropy", "binary_accuracy", "holdout_retraining"]
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    jpath = tmp_path / "c.json"
    jpath.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert load_config(jpath) == cfg


def test_the_study_config_is_the_default_with_three_seeds():
    from pathlib import Path

    study = load_config(Path(__file__).parents[1] / "configs" / "study.yaml")
    default = load_config()
    assert default.seeds == [0] and study.seeds == [0, 1, 2]
    assert study.model_copy(update={"name": default.name, "seeds": default.seeds}) == default


def test_overrides_and_appendix_c_style_tiers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rum": {
        "low": {"method": "neggrad_plus", "alpha": 0.99, "lr": 0.01, "epochs": 5},
        "mid": {"method": "neggrad_plus", "alpha": 0.97, "lr": 0.01, "epochs": 5},
        "high": {"method": "neggrad_plus", "alpha": 0.97, "lr": 0.001, "epochs": 10}}}))
    cfg = load_config(path, ["forget.steps=3", "rum.high.epochs=7"])
    assert cfg.forget.steps == 3
    assert cfg.rum.high.params.epochs == 7 and cfg.rum.high.params.lr == 0.001
    assert cfg.rum.mid.params.alpha == 0.97
    switched = load_config(path, ["rum.high.method=finetune"])  # the old alpha must not leak into finetune
    assert switched.rum.high.method == "finetune" and "alpha" not in switched.rum.high.params


def test_digest_ignores_name_only():
    a, b = load_config(None, ["name=a"]), load_config(None, ["name=b"])
    assert a.digest() == b.digest()
    assert a.digest() != load_config(None, ["forget.steps=4"]).digest()


@pytest.mark.parametrize("overrides, fragment", [
    (["forget.stepz=3"], "unknown config key 'forget.stepz'; valid keys there: steps, per_tier, retain_policy"),
    (["rum.high.method=nonsense"], "unknown method 'nonsense'"),
    (["model.name=alexnet"], "unknown model 'alexnet'"),
    (["data.name=imagenet"], "unknown data set 'imagenet'"),
    (["rum.high.alpha=1.5"], "hyperparameter 'alpha'"),
    (["rum.mid.alpha=0.5"], "method 'finetune' has no hyperparameter 'alpha'"),
    (["proxies=[confidence, vibes]"], "unknown proxy 'vibes'"),
    (["recompute=[confidence]"], "cannot be recomputed per step"),
    (["data.name=cifar10", "data.root=/nonexistent/cifar"], "data folder '/nonexistent/cifar' does not exist"),
    (["data.name=mnist"], "data.root is required for mnist"),
    (["forget.steps=0"], "forget.steps"),
    # YAML booleans where numbers go (pydantic alone would take yes as 1)
    (["train.epochs=yes"], "config train.epochs: must be a number, not the yes/no value True"),
    (["train.lr=on"], "config train.lr: must be a number, not the yes/no value True"),
    (["seeds=[0, no]"], "config seeds: must be a number, not the yes/no value False"),
    (["memorization.epochs=yes"], "config memorization.epochs: must be a number"),
    (["rum.high.epochs=yes"], "hyperparameter 'epochs' must be a number, not the yes/no value True"),
    # non-finite numbers, as YAML (.inf, .nan) or as text ("inf")
    (["train.lr=.inf"], "config train.lr: must be a finite number, not inf"),
    (["train.lr=.nan"], "config train.lr: must be a finite number, not nan"),
    (["train.weight_decay=inf"], "config train.weight_decay: must be a finite number, not inf"),
    (["holdout.lr=-.inf"], "config holdout.lr: must be a finite number"),
    (["rum.mid.lr=.nan"], "hyperparameter 'lr' must be a finite number, not nan"),
    (["vanilla.lr=.inf"], "hyperparameter 'lr' must be a finite number, not inf"),
    # seeds: numpy and scikit-learn take 0 .. 2**32 - 1
    (["data.split_seed=-1"], "config data.split_seed: must be a seed between 0 and 4294967295, not -1"),
    (["seeds=[-1]"], "config seeds: must be a seed between 0 and 4294967295, not -1"),
    (["seeds=[0, 4294967296]"], "not 4294967296"),
    (["memorization.seed=-5"], "config memorization.seed: must be a seed"),
    # devices that cannot exist anywhere
    (["device=foo"], "config device: unknown device 'foo'; use auto, cpu, cuda or cuda:N"),
    (["device=cuda:-1"], "unknown device 'cuda:-1'"),
    (["device=gpu0"], "unknown device 'gpu0'"),
])
def test_bad_config_is_one_sentence(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


def test_booleans_stay_booleans_and_numbers_stay_numbers():
    cfg = load_config(None, ["train.augment=yes", "data.download=no", "seeds=[0, 4294967295]", "train.lr=1e-3",
                             "rum.high.epochs=2"])
    assert cfg.train.augment is True and cfg.data.download is False
    assert cfg.seeds == [0, 4294967295] and cfg.train.lr == 1e-3 and cfg.rum.high.params.epochs == 2


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x9c")
    with pytest.raises(ConfigError, match="cannot be read .*not UTF-8"):
        load_config(binary)


def test_missing_config_file_and_bad_set_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="has no '='"):
        load_config(None, ["forget.steps"])


def test_cli_stops_early_with_one_line(capsys, tmp_path):
    """Errors exit with status 2 and one line, before any work is done."""
    cases = [
        (["--set", "forget.per_tier=500"], "does not fit the 1257 training examples"),
        (["--set", "rum.high.method=nonsense"], "unknown method 'nonsense'"),
        (["--set", "data.name=cifar10", "--set", f"data.root={tmp_path}/missing"], "does not exist"),
    ]
    for args, fragment in cases:
        code = main(["run", "--out", str(tmp_path), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert fragment in err and len(err.splitlines()) == 1
    assert not any(p.name != "missing" for p in tmp_path.iterdir())  # nothing written


def test_config_is_a_flow_parameter_schema():
    schema = ExperimentConfig.model_json_schema()
    assert {"data", "model", "train", "forget", "rum", "vanilla", "seeds"} <= set(schema["properties"])
