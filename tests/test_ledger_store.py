"""The service's store on both of its databases: SQLite in the service folder and a real PostgreSQL
(a throwaway cluster started once per session from Debian's binaries; those params skip, with the
reason, where initdb or psycopg is missing). Durable requests, steps that commit one row per request,
the lease, and concurrent writers that never fork the chain. No Prefect."""
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from pgcluster import fresh_schema, pg_admin_url

from rumflow.artifacts.ledger import LEDGER_FILE, Ledger, masked
from rumflow.errors import ConfigError
from rumflow.service import validate_service_config

TRAIN = np.arange(0, 100, 2)  # even ids are training examples


@pytest.fixture(scope="session")
def pg_admin():
    """The admin URL of a throwaway PostgreSQL cluster (one per test process)."""
    yield from pg_admin_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """A fresh, empty store: a SQLite file, or a new schema of the PostgreSQL cluster."""
    if request.param == "sqlite":
        return tmp_path / LEDGER_FILE
    return fresh_schema(request.getfixturevalue("pg_admin"))


@pytest.fixture
def ledger(target):
    led = Ledger.create(target, "t", "sha")
    led.set_version0("a" * 64, "test")
    yield led
    led.close()


def _other_process(target, code: str) -> str:
    """Run `code` (with `led` = the ledger at argv[1]) in a new Python process; its stdout."""
    script = f"import sys; from rumflow.artifacts.ledger import Ledger; led = Ledger(sys.argv[1]); {code}"
    out = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_requests_are_durable_and_refusals_change_nothing(ledger, target):
    req = ledger.add_request([4, 2], TRAIN, note="ticket 1")
    assert req["request_id"] == "r1" and req["state"] == "queued" and req["n_examples"] == 2
    for bad in ([2, 8], [3], []):
        with pytest.raises(ConfigError):
            ledger.add_request(bad, TRAIN)
    with pytest.raises(ConfigError, match="a request with id 'r1' already exists"):
        ledger.add_request([8], TRAIN, request_id="r1")
    with pytest.raises(ConfigError, match="request id 'bad id' is not valid"):
        ledger.add_request([8], TRAIN, request_id="bad id")
    # another process sees exactly the accepted request, the moment add_request returned
    seen = _other_process(target, "print(len(led.requests()), led.request_ids('r1'), led.requests()[0]['note'])")
    assert seen.split(maxsplit=1) == ["1", "[2, 4] ticket 1\n"]
    assert ledger.request_ids("r1") == [2, 4]


def test_a_step_commits_one_row_per_request_and_promotes_once(ledger):
    ledger.add_request([2, 4], TRAIN)
    ledger.add_request([6], TRAIN, request_id="ticket-9")
    assert ledger.try_lease("me", 60) == {}
    step = ledger.open_step("all", "me")
    assert step.request_ids == ["r1", "ticket-9"] and step.example_ids == [2, 4, 6] and step.target == 1
    assert {r["state"] for r in ledger.requests()} == {"running"}
    again = ledger.open_step("all", "me")  # a crashed run's step is resumed, not a new one
    assert again.step == step.step and again.resumed and again.request_ids == step.request_ids
    with pytest.raises(ConfigError, match="already queued"):
        ledger.add_request([4], TRAIN)  # running ids are pending too
    with pytest.raises(RuntimeError, match="lost the service lease"):
        ledger.commit_step(step, "b" * 64, True, None, {"figures": {}}, "someone-else")
    version = ledger.commit_step(step, "b" * 64, True, None, {"figures": {"acc_forget": 0.5}, "gates": [],
                                                              "seconds": 1.25}, "me")
    assert version == 1 and ledger.current() == (1, "b" * 64)
    with pytest.raises(RuntimeError, match="not running any more"):
        ledger.commit_step(step, "b" * 64, True, None, {}, "me")
    rows = ledger.rows()
    assert [r["request_id"] for r in rows] == ["r1", "ticket-9"]
    assert all(r["version"] == 1 and r["parent_version"] == 0 and r["figures"]["acc_forget"] == 0.5 for r in rows)
    assert rows[0]["step_requests"] == ["r1", "ticket-9"] and rows[0]["seconds"] == 1.25
    assert ledger.forgotten() == [2, 4, 6]
    assert ledger.open_step("all", "me") is None
    with pytest.raises(ConfigError, match="already forgotten"):
        ledger.add_request([6], TRAIN)
    ledger.add_audit(1, "b" * 64, "c" * 64, 3, {"tow": 0.9, "tow_mia": 0.8}, 2.0, None)
    ledger.add_audit(1, "b" * 64, "c" * 64, 3, {"tow": 0.9, "tow_mia": 0.8}, 2.0, None)
    assert [a["audit"] for a in ledger.audits()] == [1, 2] and ledger.audits()[0]["figures"]["tow"] == 0.9


def test_a_failed_step_keeps_the_version_unpromoted_and_frees_the_ids(ledger):
    ledger.add_request([2], TRAIN)
    ledger.add_request([4], TRAIN)
    ledger.try_lease("me", 60)
    step = ledger.open_step("one", "me")
    assert step.request_ids == ["r1"]
    assert ledger.commit_step(step, "c" * 64, False, "missed a gate", {"gates": []}, "me") == 1
    assert ledger.current()[0] == 0 and ledger.version(1)["promoted"] == 0
    assert ledger.request("r1")["state"] == "failed" and ledger.request("r1")["reason"] == "missed a gate"
    assert ledger.forgotten() == []
    ledger.add_request([2], TRAIN)  # a failed request's ids may be sent again
    step = ledger.open_step("one", "me")
    assert step.request_ids == ["r2"] and step.parent == 0 and step.target == 2
    with pytest.raises(ConfigError, match="no version 7; versions run from 0 to 1"):
        ledger.version(7)


def test_withdraw_only_a_queued_request(ledger):
    ledger.add_request([2], TRAIN)
    ledger.reject("r1", "sent by mistake")
    assert ledger.request("r1")["state"] == "rejected"
    with pytest.raises(ConfigError, match="is rejected, not queued"):
        ledger.reject("r1", "again")
    ledger.add_request([2], TRAIN)  # the ids are free again


def test_lease_excludes_a_live_holder_and_takes_over_a_dead_one(ledger, target):
    code = ("print(Ledger(sys.argv[1]).try_lease('other', 60) is not None); sys.stdout.flush(); sys.stdin.read()")
    script = f"import sys; from rumflow.artifacts.ledger import Ledger; {code}"
    holder = subprocess.Popen([sys.executable, "-c", script, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    assert ledger.try_lease("me", 60) is None  # a live process holds it
    row = ledger.lease_holder()
    assert row["pid"] == holder.pid and abs(row["heartbeat"] - time.time()) < 30  # a full-precision timestamp
    holder.kill()
    holder.wait()
    previous = ledger.try_lease("me", 60)  # its holder died: taken over at once
    assert previous["holder"] == "other" and ledger.holds_lease("me")
    assert ledger.heartbeat("me") and not ledger.heartbeat("other")
    ledger.release("me")
    assert ledger.lease_holder() is None


def _together(n: int, target, work) -> list:
    """Run work(ledger, i) in n threads, each with its own connection, released at the same instant."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        led = Ledger(target)
        barrier.wait()
        try:
            results[i] = work(led, i)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each writer got
            results[i] = exc
        finally:
            led.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_concurrent_writers_are_serialized_and_never_fork_the_chain(ledger, target):
    # the same id from six writers at once: exactly one is queued, the others get the refusal sentence
    got = _together(6, target, lambda led, i: led.add_request([10, 12 + 2 * i], TRAIN)["request_id"])
    assert sum(isinstance(g, str) for g in got) == 1, got
    assert all(isinstance(g, ConfigError) and "already queued" in str(g) for g in got if not isinstance(g, str))
    got = _together(6, target, lambda led, i: led.add_request([40 + 2 * i], TRAIN)["request_id"])
    assert sorted(got) == [f"r{n}" for n in range(2, 8)]  # fresh ids and sequence numbers, none lost
    assert [r["seq"] for r in ledger.requests()] == list(range(1, 8))

    def serve(led, i):
        """What a service run does: take the lease, run the queue's oldest request as a step, let go."""
        steps = []
        deadline = time.monotonic() + 60
        while any(r["state"] in ("queued", "running") for r in led.requests()):
            if time.monotonic() > deadline:
                raise TimeoutError("the queue did not drain")
            if led.try_lease(f"w{i}", 60) is None:
                time.sleep(0.01)
                continue
            step = led.open_step("one", f"w{i}")
            if step is not None:
                led.commit_step(step, f"{step.target:064x}", True, None, {"gates": []}, f"w{i}")
                steps.append(step.step)
            led.release(f"w{i}")
        return steps

    # six runs at once over seven requests; at every instant at most one holds the lease
    done = _together(6, target, serve)
    assert not any(isinstance(d, Exception) for d in done), done
    assert sorted(s for d in done for s in d) == list(range(1, 8))  # each step committed by one run, once
    versions = ledger.versions()
    assert [(v["version"], v["parent"], v["promoted"]) for v in versions] == [
        (0, None, 1), *[(n, n - 1, 1) for n in range(1, 8)]]  # one chain: every parent is the previous version
    rows = ledger.rows()
    assert sorted(r["request_id"] for r in rows) == [f"r{n}" for n in range(1, 8)]
    assert ledger.current()[0] == 7

    # at one instant six runs ask for a free lease: exactly one gets it
    got = _together(6, target, lambda led, i: led.try_lease(f"x{i}", 60))
    assert sum(g is not None for g in got) == 1, got


# -- opening and creating: one sentence for each problem ----------------------------------------------------

def test_opening_a_missing_ledger_names_the_fix(target):
    with pytest.raises(ConfigError, match="holds no service ledger; create the service first"):
        Ledger(target)
    assert not Ledger.exists(target)
    Ledger.create(target, "t", "sha").close()
    assert Ledger.exists(target)
    with pytest.raises(ConfigError, match="already holds a service"):
        Ledger.create(target, "t", "sha")


def test_store_url_problems_are_one_sentence(monkeypatch, pg_admin):
    with pytest.raises(ConfigError, match=r"config store.url: 'mysql://u@h/db' is not a PostgreSQL URL; write "
                       r"postgresql://user@host:port/database, or null for SQLite in the service folder\.$"):
        validate_service_config({"store": {"url": "mysql://u@h/db"}})
    assert validate_service_config({"store": {"url": "postgresql://u@h:5/db"}}).store.url == "postgresql://u@h:5/db"
    assert validate_service_config({}).digest() == validate_service_config(
        {"store": {"url": "postgresql://u@h:5/db"}}).digest()  # where the ledger lives decides no number
    with pytest.raises(ConfigError, match=r"^store.url 'postgresql://u:\*\*\*@h:x/db' is not a valid PostgreSQL "
                       r"URL \(.*\); write it as postgresql://user@host:port/database\.$"):
        Ledger("postgresql://u:secret@h:x/db")
    with pytest.raises(ConfigError, match=r'is not a valid PostgreSQL URL \(invalid URI query parameter: "bogus"\)'):
        Ledger("postgresql://u@h/db?bogus=1")
    port = pg_admin.rsplit(":", 1)[1].split("/")[0]
    wrong = pg_admin.replace(f":{port}/", f":{int(port) + 1}/")  # nothing listens there
    with pytest.raises(ConfigError) as err:
        Ledger(wrong)
    text = str(err.value)
    assert text.startswith(f"cannot connect to the service store at {masked(wrong)} (") and text.endswith(
        "; check store.url and that the database server is running.") and text.count("\n") == 0
    assert pg_admin.split(":")[2].split("@")[0] not in text  # the password is never printed
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the postgres extra were not installed
    with pytest.raises(ConfigError, match=r'^store.url names a PostgreSQL database, which needs psycopg: install '
                       r'it with `pip install -e "\.\[postgres\]"`\.$'):
        Ledger(pg_admin)
