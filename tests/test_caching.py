"""What a task's cache key covers: its inputs and the code it runs, not where the run folder lives."""
import shutil

import pandas as pd
from apihelpers import run_experiment, task_states

from rumflow.tasks import caching


def test_an_unlearning_key_covers_its_methods_modules_only():
    scrub = set(caching.method_modules("scrub"))
    assert "rumflow.methods.scrub" in scrub and "rumflow.methods.registry" in scrub
    assert "rumflow.methods.neggrad" not in scrub
    assert "rumflow.methods.scrub" not in caching.method_modules("neggrad_plus")
    # a preset runs its base method's function: same modules
    salun = caching.method_modules("salun")
    assert "rumflow.methods.relabel" in salun


def test_a_key_holds_what_a_parent_model_is_not_how_long_it_took():
    """A parent recomputed to the same weights (other seconds, other examples) keys its children the
    same; other weights key them differently (also inside lists, as forgetting quality takes them)."""
    from types import SimpleNamespace

    from rumflow.artifacts.checkpoints import CheckpointRef
    from rumflow.config import MethodSpec
    from rumflow.tasks.refs import Trained, Unlearned
    from rumflow.tasks.unlearning import unlearn_task

    ctx = SimpleNamespace(task=unlearn_task)  # compute_key reads the task's name and module only
    policy = unlearn_task.cache_policy
    ref = CheckpointRef(sha256="a" * 64, size=10, file_sha256="b" * 64)
    other = CheckpointRef(sha256="c" * 64, size=10, file_sha256="b" * 64)

    def key(parent) -> str:
        inputs = {"parent": parent, "models": [parent], "spec": MethodSpec(method="scrub"), "workdir": "/x",
                  "label": "y"}
        return policy.compute_key(ctx, inputs, {})

    assert key(Trained(ckpt=ref, seconds=1.0)) == key(Trained(ckpt=ref, seconds=7.5, events_seconds=3.0))
    assert key(Unlearned(ckpt=ref, seconds=1.0, examples=5)) == key(Unlearned(ckpt=ref, seconds=2.0, examples=9))
    assert key(Trained(ckpt=ref, seconds=1.0)) != key(Trained(ckpt=other, seconds=1.0))
    assert key(Unlearned(ckpt=ref, seconds=1.0)) != key(Unlearned(ckpt=other, seconds=1.0))


def test_the_training_key_does_not_cover_methods_config_or_flows():
    key = caching.TaskKey(modules=caching.DATA + caching.MODELS + caching.TRAINING + caching.STORE)
    before = key.code("rumflow.tasks.training", {})
    caching.module_digest.cache_clear()
    import rumflow.methods.scrub as scrub_module

    real = caching.module_digest
    try:  # a different source for a method module, a flow and the config: the training code is the same
        caching.module_digest = lambda name: "edited" if name in (scrub_module.__name__, "rumflow.config",
                                                                   "rumflow.flows.experiment") else real(name)
        assert key.code("rumflow.tasks.training", {}) == before
        assert key.code("rumflow.tasks.training", {}) != caching.TaskKey(
            modules=caching.DATA + caching.MODELS + caching.STORE + ("rumflow.methods.scrub",)).code(
            "rumflow.tasks.training", {})
    finally:
        caching.module_digest = real


def test_a_moved_run_folder_is_served_from_its_cache(prefect_api, tmp_path, tiny_config):
    config = {**tiny_config, "proxies": ["confidence"], "forget": {"steps": 1, "per_tier": 5}}
    run_dir, first = run_experiment(config, tmp_path / "here")
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    shutil.move(str(run_dir), str(moved / run_dir.name))
    again, second = run_experiment(config, moved)
    states = task_states(second)
    assert states and all(state == "Cached" for _, state in states), states
    pd.testing.assert_frame_equal(pd.read_parquet(again / "steps.parquet").drop(columns="host"),
                                  pd.read_parquet(moved / run_dir.name / "steps.parquet").drop(columns="host"))


def test_editing_one_method_file_recomputes_only_its_unlearning_and_what_follows(prefect_api, tmp_path,
                                                                                  tiny_config):
    """A real edit of the finetune method's source (restored afterwards): originals, proxies, plans,
    references and the vanilla chain (neggrad_plus) come back Cached; the finetune tier recomputes."""
    import rumflow.methods.basic as basic

    config = {**tiny_config, "proxies": ["confidence"], "forget": {"steps": 1, "per_tier": 5}}
    run_experiment(config, tmp_path)
    source = caching.Path(basic.__file__)
    original = source.read_bytes()
    try:
        source.write_bytes(original + b"\n# an edit that changes no behaviour\n")
        caching.module_digest.cache_clear()
        _, second = run_experiment(config, tmp_path)
    finally:
        source.write_bytes(original)
        caching.module_digest.cache_clear()
    states = dict(task_states(second))
    assert states["unlearn s0/confidence/step1/rum-mid/finetune"] == "Completed"
    assert states["unlearn s0/confidence/step1/rum-low/none"] == "Completed"  # `none` lives in the same file
    for name in ("train s0/original", "proxy s0/confidence", "plan s0/confidence/step1",
                 "train s0/confidence/step1/retrain", "unlearn s0/confidence/step1/vanilla/neggrad_plus",
                 "evaluate s0/confidence/step1/vanilla/neggrad_plus"):
        assert states[name] == "Cached", (name, states)
