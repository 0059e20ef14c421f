"""Planning and evaluation tasks: the tiers of a step, the metrics of a model, forgetting quality."""
from __future__ import annotations

from typing import Any

from rumflow.config import DataConfig, EvaluateConfig, ForgettingQualityConfig, ModelConfig
from rumflow.planning import StepPlan, plan_step
from rumflow.proxies.registry import PROXIES, memorization_of
from rumflow.runtime import dataset_on, model_from_state
from rumflow.tasks.caching import DATA, EVALUATION, MODELS, STORE, cached_task
from rumflow.tasks.compute import settle_threads
from rumflow.tasks.refs import Scores, Trained, Unlearned, store

Model = Trained | Unlearned


@cached_task("plan", run_name="plan {label}", code=DATA + ("rumflow.planning", "rumflow.proxies.registry"))
def plan_task(step: int, proxy: str, scores: Scores, previous: StepPlan | None, per_tier: int, data: DataConfig,
              device: str, workdir: str, label: str = "") -> StepPlan:
    """Step `step`'s tiers: chosen by `proxy`'s scores from the pool left after the previous steps."""
    ids = dataset_on(data, device).train.ids()
    raw = scores.load(workdir).set_index("example_id").loc[ids, "score"].to_numpy()
    before = previous.forgotten if previous is not None else []
    return plan_step(step, ids, memorization_of(proxy, raw), before, per_tier, PROXIES[proxy].mid_target)


@cached_task("evaluate", run_name="evaluate {label}", code=DATA + MODELS + STORE + EVALUATION)
def evaluate_task(trained: Model, plan: StepPlan, data: DataConfig, model: ModelConfig, evaluate: EvaluateConfig,
                  seed: int, device: str, workdir: str, label: str = "") -> dict[str, Any]:
    """Accuracies and MIA of one model against one step's plan."""
    from rumflow.evaluation import evaluate_model

    settle_threads()
    ds = dataset_on(data, device)
    net = model_from_state(model, ds, store(workdir).load_state(trained.ckpt))
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in evaluate_model(net, ds, plan, evaluate, seed).items()}


@cached_task("forgetting-quality", run_name="forgetting-quality {label}", code=DATA + MODELS + STORE + EVALUATION)
def forgetting_quality_task(unlearned: list[Model], retrained: list[Model], plan: StepPlan, data: DataConfig,
                            model: ModelConfig, quality: ForgettingQualityConfig, device: str, workdir: str,
                            label: str = "") -> dict[str, Any]:
    """Forgetting quality F and the challenge's final score from N unlearned and N retrained models."""
    from rumflow.evaluation import forgetting_quality_of

    settle_threads()
    ds = dataset_on(data, device)
    runs = store(workdir)
    load = lambda m: model_from_state(model, ds, runs.load_state(m.ckpt))  # noqa: E731
    return forgetting_quality_of([load(m) for m in unlearned], [load(m) for m in retrained], ds, plan, quality)
