"""The experiment configuration: one validated model, loaded from YAML/JSON and `--set` overrides."""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo,
                      ValidatorFunctionWrapHandler, field_validator, model_validator)

from rumflow.data import DATASETS
from rumflow.errors import ConfigError
from rumflow.models import MODELS


SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds must fit in 32 unsigned bits


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (int | None -> {int, NoneType}; list[float] -> {float})."""
    origin = get_origin(annotation)
    if origin is None:
        return {annotation}
    if origin is Literal:
        return {type(a) for a in get_args(annotation)}
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    return set().union(*(_leaf_types(a) for a in get_args(annotation))) if get_args(annotation) else {origin}


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def number_problem(annotation: Any, raw: Any, parsed: Any = None, seed: bool = False) -> str | None:
    """Why a value does not fit a numeric field, in words (None when it fits or the field is not numeric):
    a YAML boolean where a number goes (yes/no/on/off/true/false parse as booleans, and pydantic would
    take them as 1/0), a non-finite number, or a negative or too large seed."""
    kinds = _leaf_types(annotation)
    if not kinds & {int, float} or bool in kinds:
        return None
    for v in _items(raw):
        if isinstance(v, bool):
            return (f"must be a number, not the yes/no value {v} (YAML reads yes/no/on/off/true/false as "
                    "booleans); write a number")
    for v in _items(parsed):
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, not {v}; write a finite number"
        if seed and isinstance(v, int) and not 0 <= v <= SEED_MAX:
            return f"must be a seed between 0 and {SEED_MAX}, not {v}; use a non-negative seed"
    return None


def _is_seed(name: str) -> bool:
    return name in ("seed", "seeds") or name.endswith("_seed")


class Strict(BaseModel):
    """Frozen, and unknown keys are errors; on every numeric field, booleans, non-finite numbers and
    seeds outside 0..2**32-1 are refused with one sentence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="wrap")
    @classmethod
    def _strict_numbers(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return handler(value)
        seed = _is_seed(info.field_name or "")
        problem = number_problem(field.annotation, value, value, seed)  # before pydantic's own bounds
        if problem:
            raise ValueError(problem)
        parsed = handler(value)
        problem = number_problem(field.annotation, value, parsed, seed)  # strings such as "inf" parse late
        if problem:
            raise ValueError(problem)
        return parsed


class DataConfig(Strict):
    name: str = Field("digits", description="digits | cifar10 | cifar100 | mnist")
    root: str | None = Field(None, description="local torchvision-format folder (not needed for digits)")
    split_seed: int = Field(0, description="seed of the train/val(/test) split")
    download: bool = Field(False, description="let torchvision download the data set into root")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(DATASETS.unknown(v))
        return v

    @model_validator(mode="after")
    def _root_exists(self) -> "DataConfig":
        if self.name == "digits":
            return self
        if self.root is None:
            raise ValueError(f"data.root is required for {self.name}; set it to the folder that holds "
                             "the torchvision-format files (or add data.download: true)")
        if not self.download and not Path(self.root).expanduser().is_dir():
            raise ValueError(f"data folder '{self.root}' does not exist; point data.root at the folder that "
                             f"holds the {self.name} files, or set data.download: true to fetch them")
        return self


class ModelConfig(Strict):
    name: str = Field("small_cnn", description="small_cnn | resnet18 | vgg16_bn")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(MODELS.unknown(v))
        return v


class TrainConfig(Strict):
    epochs: int = Field(30, ge=1, description="epochs of the original model and of every retrain reference")
    lr: float = Field(0.1, gt=0, description="peak learning rate (cosine schedule to 0)")
    batch_size: int = Field(128, ge=2, description="mini-batch size")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    augment: bool | None = Field(None, description="crop+flip; default: on for 32x32 images, off otherwise")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training precision: bf16 autocast or fp32; auto = bf16 on CUDA (when the GPU "
        "supports it), fp32 on CPU")
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="NHWC memory format for the convolutions (training, methods, evaluation); auto = on "
        "for CUDA and CPU; false = plain NCHW")
    compile: bool = Field(False, description="torch.compile the model in every training run (GPU; each run "
                          "pays its compile time; needs a C++ compiler on CPU)")


class HoldoutConfig(Strict):
    split: Literal["val", "test"] = Field("test", description="held-out split the copy is fine-tuned on")
    lr: float = Field(0.1, gt=0, description="fine-tuning learning rate")
    max_epochs: int = Field(30, ge=1, description="at most this many epochs")
    patience: int = Field(4, ge=1, description="stop when the epoch's summed loss has not improved this long")
    batch_size: int = Field(128, ge=2, description="mini-batch size")


class MemorizationConfig(Strict):
    estimate: bool = Field(False, description="estimate true memorization in `rumflow run` to grade the proxies "
                           "(implied when `memorization` is among the proxies)")
    models: int = Field(256, ge=2, description="R: models trained on random subsets (256: two independent "
                        "256-model estimates on digits agree at Spearman 0.87, Pearson 0.99, top-20 overlap 0.95)")
    subset: float = Field(0.7, gt=0, lt=1, description="fraction of D_train each model sees")
    epochs: int | None = Field(None, ge=1, description="epochs per model (default: train.epochs)")
    seed: int = Field(0, description="seed of the subsets and of the models")


class ForgetConfig(Strict):
    steps: int = Field(5, ge=1, description="K sequential unlearning steps")
    per_tier: int = Field(20, ge=1, description="examples per tier per step (the vanilla set is 3x this)")
    retain_policy: Literal["strict", "rum"] = Field(
        "strict", description="strict: a sub-step's retain set excludes every tier of the step; "
        "rum: RUM's code (later tiers of the step stay in the retain set)")


class MethodSpec(Strict):
    """A method name plus its hyperparameters, validated against the method's own model."""

    method: str
    params: SerializeAsAny[BaseModel] = Field(description="the method's typed hyperparameters")

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        from rumflow.methods.registry import validate_params

        if isinstance(data, str):
            data = {"method": data}
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "method" not in data:
            raise ValueError("a method entry needs a 'method' key, e.g. {method: finetune, lr: 0.01}")
        method = data.pop("method")
        params = data.pop("params", {}) or {}
        params = {**params, **data}
        _check_param_numbers(method, params, None)
        try:
            validated = validate_params(method, params)
        except ConfigError as exc:
            raise ValueError(str(exc).rstrip(".")) from None
        _check_param_numbers(method, params, validated)
        return {"method": method, "params": validated}


def _check_param_numbers(method: str, raw: dict[str, Any], validated: BaseModel | None) -> None:
    """The Strict number rules for a method's hyperparameters (they are not Strict models): before
    validation on the raw values, after it on the parsed ones."""
    from rumflow.methods.registry import get_method

    try:
        fields = get_method(method).params.model_fields
    except ConfigError:
        return  # an unknown method: validate_params says so
    for key, field in fields.items():
        if key not in raw and validated is None:
            continue
        parsed = raw.get(key) if validated is None else getattr(validated, key)
        problem = number_problem(field.annotation, raw.get(key), parsed, seed=_is_seed(key))
        if problem:
            raise ValueError(f"method '{method}': hyperparameter '{key}' {problem}")


def _digits(entry: str) -> dict[str, Any]:
    """The default experiment's method for `entry` (mid | high | vanilla): methods/digits.yaml, where the
    digits settings live (RUM's CIFAR hyperparameters barely move a model on digits)."""
    from rumflow.methods.registry import dataset_settings

    return dict(dataset_settings("digits")["experiment"][entry])


class RumConfig(Strict):
    low: MethodSpec = Field(default_factory=lambda: MethodSpec(method="none"),
                            description="method for the least memorized tier (unlearned first)")
    mid: MethodSpec = Field(default_factory=lambda: MethodSpec.model_validate(_digits("mid")),
                            description="method for the middle tier")
    high: MethodSpec = Field(default_factory=lambda: MethodSpec.model_validate(_digits("high")),
                             description="method for the most memorized tier (unlearned last)")


class ForgettingQualityConfig(Strict):
    models: int = Field(0, ge=0, description="N unlearned and N retrained models with different seeds, per "
                        "proxy and strategy at step 1 of the first seed (0 = off; 16 is affordable on digits)")
    scalar: Literal["ce_argmax", "ce_true_label", "logit_true"] = Field(
        "ce_argmax", description="the per-model output the attacks separate: ce_argmax = -log max softmax "
        "(the public scoring code's, label-free), ce_true_label = -log p_y, logit_true = log p_y - log(1 - p_y)")
    attacks: tuple[Literal["threshold", "threshold_mirrored", "logistic"], ...] = Field(
        ("threshold",), min_length=1, description="threshold = the public code's (every observed value as a "
        "threshold), threshold_mirrored = also the opposite direction, logistic = the public 3-fold "
        "logistic-regression attack")
    delta: float = Field(0.01, gt=0, lt=1, description="delta of the (eps, delta) estimate")
    bin_width: float = Field(0.5, gt=0, description="width of the eps bins")
    n_bins: int = Field(13, ge=1, description="number of eps bins (the last takes every larger eps and inf)")

    @field_validator("models")
    @classmethod
    def _not_one(cls, v: int) -> int:
        if v == 1:
            raise ValueError("forgetting quality compares distributions over models: use 0 (off) or at least 2")
        return v


class EvaluateConfig(Strict):
    forgetting_quality: ForgettingQualityConfig = Field(default_factory=ForgettingQualityConfig)
    mia: bool = Field(True, description="run the SVC membership-inference attack (five features)")
    mia_max_shadow: int = Field(10000, ge=10, description="at most this many retain examples as shadow members")
    loss_mia_max: int = Field(10000, ge=6, description="at most this many forget and as many test examples "
                              "(seeded subsample) in the loss MIA and the loss JS distance")


class RunnerConfig(Strict):
    """Where the tasks run (it never changes a result, so it is not part of the config digest)."""

    kind: Literal["threads", "processes", "ray", "dask"] = Field(
        "threads", description="threads (default) | processes | ray (pip install -e '.[ray]') | dask "
        "(pip install -e '.[dask]')")
    address: str | None = Field(None, description="ray: an existing cluster (ray://host:10001 or host:6379); "
                                "dask: a scheduler (tcp://host:8786); empty = start a local one for the run")
    workers: int | None = Field(None, ge=1, description="tasks at once (default: one per CPU core, one per GPU)")


ALL_PROXIES = ["confidence", "max_confidence", "entropy", "binary_accuracy", "holdout_retraining"]


class ExperimentConfig(Strict):
    name: str = Field("digits-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="run name: results go to <out>/<name>/")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    proxies: list[str] = Field(default_factory=lambda: list(ALL_PROXIES), min_length=1,
                               description="proxies that tier the forget sets (one experiment arm each)")
    recompute: list[str] = Field(default_factory=list,
                                 description="proxies recomputed on the current RUM model at every step")
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)
    memorization: MemorizationConfig = Field(default_factory=MemorizationConfig)
    forget: ForgetConfig = Field(default_factory=ForgetConfig)
    rum: RumConfig = Field(default_factory=RumConfig)
    vanilla: MethodSpec = Field(default_factory=lambda: MethodSpec.model_validate(_digits("vanilla")),
                                description="the one method applied to the union of the tiers")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    # One replicate by default, so that the default experiment takes under 5 minutes on 2 cores (three
    # took 9-10 minutes: the grid's compute alone is ~308 core-seconds per seed); configs/study.yaml has three.
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="replicates: each trains its own original model")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="where the tasks run")

    @field_validator("proxies", "recompute")
    @classmethod
    def _known_proxies(cls, v: list[str]) -> list[str]:
        from rumflow.proxies.registry import PROXIES

        for name in v:
            if name not in PROXIES:
                raise ValueError(PROXIES.unknown(name))
        if len(set(v)) != len(v):
            raise ValueError("a proxy is listed twice; list each once")
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", v):
            raise ValueError(f"unknown device '{v}'; use auto, cpu, cuda or cuda:N (N = the GPU's index)")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("a seed is listed twice; list each once")
        return v

    @model_validator(mode="after")
    def _recompute_ok(self) -> "ExperimentConfig":
        from rumflow.proxies.registry import PROXIES

        for name in self.recompute:
            if not PROXIES[name].recomputable:
                ok = [p.name for p in PROXIES.values() if p.recomputable]
                raise ValueError(f"proxy '{name}' cannot be recomputed per step (it comes from training the "
                                 f"original model); only {', '.join(ok)} can")
            if name not in self.proxies:
                raise ValueError(f"recompute lists '{name}', which is not in proxies; add it there too")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of everything except the name (what determines the numbers)."""
        body = self.model_dump(mode="json", exclude={"name", "runner"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading, overriding, and one-sentence errors


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config model class that owns the key at `loc` (for listing valid keys)."""
    cls: Any = ExperimentConfig
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def explain(exc: ValidationError) -> str:
    """One sentence for the first problem of a validation error."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc)
        valid = f"; valid keys there: {', '.join(owner.model_fields)}" if owner else ""
        return f"unknown config key '{key}'{valid}."
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("value_error", "assertion_error"):
        return f"config {key}: {msg}." if key != "(top level)" else f"config: {msg}."
    return f"config {key}: {msg.lower()} (got {err.get('input')!r}); fix it in the config or with --set."


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a nested dict (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}' has no '='; write it as key=value, e.g. forget.steps=3.")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set '{assignment}' names no key; write it as key=value, e.g. forget.steps=3.")
    node, default = data, ExperimentConfig().model_dump(mode="json")
    for part in parts[:-1]:
        default = default.get(part) if isinstance(default, dict) else None
        child = node.get(part)
        if isinstance(child, str):
            child = {"method": child}
        if not isinstance(child, dict):
            child = copy.deepcopy(default) if isinstance(default, dict) else {}
        node[part] = child
        node = child
    value = _parse_value(raw)
    if parts[-1] == "method" and node.get("method") != value:
        node.clear()  # another method's hyperparameters would not validate for this one
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML/JSON (or start from the defaults), apply overrides, validate; ConfigError on problems."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file '{p}' is a folder; give --config a YAML or JSON file.")
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; check the path given to --config.")
        try:
            loaded = yaml.safe_load(p.read_text())  # JSON is YAML too
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"config file '{p}' cannot be read ({reason}); give --config a readable YAML "
                              "or JSON file.") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML/JSON ({exc.__class__.__name__}); "
                              "fix its syntax.") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of keys to values at the top level.")
        data = loaded or {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    return validate_config(data)


def validate_config(data: dict[str, Any] | ExperimentConfig) -> ExperimentConfig:
    """Validate a mapping into an ExperimentConfig; ConfigError with one sentence on failure."""
    if isinstance(data, ExperimentConfig):
        return data
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc)) from None


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (every default spelled out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
