"""The same config gives the same steps.parquet on every task runner: threads, processes, a real local
Ray cluster (same checkpoint digests on CPU)."""
import sys

import pandas as pd
import pytest
from apihelpers import run_experiment, task_states

from rumflow.config import validate_config
from rumflow.errors import ConfigError
from rumflow.flows.runners import check_runner, task_runner

TIME = {"seconds", "seconds_step", "retrain_seconds", "rte", "rte_step", "host", "efficient"}


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c in TIME])


def test_threads_processes_and_ray_give_the_same_rows(prefect_api, tmp_path, tiny_config):
    pytest.importorskip("prefect_ray")
    config = {**tiny_config, "proxies": ["confidence"], "forget": {"steps": 1, "per_tier": 5}}
    tables = {}
    for kind, workers in (("threads", 2), ("threads", 1), ("processes", 2), ("ray", 2)):
        run_dir, flow_id = run_experiment({**config, "runner": {"kind": kind, "workers": workers}},
                                          tmp_path / f"{kind}{workers}")
        states = task_states(flow_id)
        assert states and all(state == "Completed" for _, state in states), (kind, states)
        tables[(kind, workers)] = comparable(pd.read_parquet(run_dir / "steps.parquet"))
    for other in (("threads", 1), ("processes", 2), ("ray", 2)):  # one torch thread per task on CPU, always
        pd.testing.assert_frame_equal(tables[other], tables[("threads", 2)])


def test_a_runner_without_its_extra_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]'"):
        check_runner(validate_config({"runner": {"kind": "ray"}}).runner)
    monkeypatch.setitem(sys.modules, "prefect_dask", None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[dask\]'"):
        task_runner(validate_config({"runner": {"kind": "dask"}}))


def test_the_runner_is_not_part_of_the_config_digest():
    a = validate_config({"runner": {"kind": "threads"}})
    b = validate_config({"runner": {"kind": "ray", "workers": 4}})
    assert a.digest() == b.digest()


def test_a_busy_api_is_asked_again_and_other_errors_are_not():
    """retrying_busy_api calls again on 503 (the embedded SQLite server's 'busy'), up to its delays, and
    lets any other error through at once."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    from rumflow.flows.experiment import retrying_busy_api

    def failing(status: int, times: int):
        calls = []

        def call():
            calls.append(1)
            if len(calls) <= times:
                request = httpx.Request("POST", "http://127.0.0.1/api/task_runs/")
                raise PrefectHTTPStatusError.from_httpx_error(httpx.HTTPStatusError(
                    "busy", request=request, response=httpx.Response(status, request=request)))
            return "done"
        return call, calls

    call, calls = failing(503, 2)
    assert retrying_busy_api(call, "step", delays=(0, 0, 0)) == "done" and len(calls) == 3
    call, calls = failing(503, 5)
    with pytest.raises(PrefectHTTPStatusError):
        retrying_busy_api(call, "step", delays=(0, 0))
    assert len(calls) == 3  # two delays: three calls, then the error
    call, calls = failing(500, 1)
    with pytest.raises(PrefectHTTPStatusError):
        retrying_busy_api(call, "step", delays=(0, 0))
    assert len(calls) == 1
