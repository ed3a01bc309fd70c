"""The job store's contract, run over both backends (SQLite in the home folder; PostgreSQL on a
server of the tests' own): keys stored only as an HMAC, idempotent jobs, every job claimed by
exactly one of many concurrent workers, leases that run out and are taken over, one job of a
model at a time."""

from __future__ import annotations

import threading
import time

import pytest

from imgclf.core.errors import SettingsError
from imgclf.serve.database import DatabaseError
from imgclf.serve.store import Home, Store


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> tuple[Home, str | None]:
    home = Home(tmp_path / "home")
    if request.param == "sqlite":
        return home, None
    return home, request.getfixturevalue("postgres_url")


def test_keys_are_stored_as_digests_and_revoked_by_scope(database):
    store = Store(*database)
    admin, predict = store.create_key("admin"), store.create_key("predict")
    assert (store.key_scope(admin), store.key_scope(predict), store.key_scope("imgclf_wrong")) == (
        "admin",
        "predict",
        None,
    )
    rows = store.query("SELECT * FROM keys")
    assert len(rows) == 2 and not any(admin in str(row) or predict in str(row) for row in rows)
    assert store.revoke_keys("predict") == 1
    assert store.key_scope(predict) is None and store.key_scope(admin) == "admin"
    assert store.revoke_keys() == 1 and not store.has_keys()


def test_a_repeated_idempotency_key_makes_one_job(database):
    store = Store(*database)
    first, new = store.add_job("m1", {"epochs": 2}, "same")
    again, new_again = store.add_job("m1", {"epochs": 9}, "same")
    assert new and not new_again and again["id"] == first["id"]
    assert store.one("SELECT COUNT(*) AS n FROM jobs")["n"] == 1


def test_concurrent_workers_claim_each_job_exactly_once(database):
    Store(*database)  # the schema, before the workers race
    jobs = {Store(*database).add_job(f"m{n}", {}, None)[0]["id"] for n in range(12)}
    claims: list[tuple[str, str]] = []
    start = threading.Barrier(6)

    def work(name: str) -> None:
        store = Store(*database)  # a connection of its own, as a worker machine has
        start.wait()
        while (job := store.claim_job(name)) is not None:
            claims.append((job["id"], name))
            store.finish_job(job["id"], "succeeded")

    threads = [threading.Thread(target=work, args=(f"host-{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    claimed = [job_id for job_id, _ in claims]
    assert sorted(claimed) == sorted(jobs), "each job claimed once, none left"
    rows = Store(*database).query("SELECT state, attempt FROM jobs")
    assert {(row["state"], row["attempt"]) for row in rows} == {("succeeded", 1)}


def test_a_lease_that_runs_out_is_taken_over(database):
    store = Store(*database)
    job, _ = store.add_job("m1", {}, None)
    assert store.claim_job("host-1", lease_s=0.3)["attempt"] == 1
    assert store.claim_job("host-2") is None, "the lease still runs"
    time.sleep(0.5)
    taken = store.claim_job("host-2")
    assert taken["id"] == job["id"] and taken["attempt"] == 2 and taken["worker"] == "host-2"
    assert not store.renew_lease(job["id"], "host-1"), "the old worker learns that it lost the job"
    assert store.renew_lease(job["id"], "host-2")


def test_one_job_of_a_model_runs_at_a_time(database):
    store = Store(*database)
    first, _ = store.add_job("m1", {}, "a")
    second, _ = store.add_job("m1", {}, "b")
    other, _ = store.add_job("m2", {}, None)
    assert store.claim_job("host-1")["id"] == first["id"]
    assert store.claim_job("host-2")["id"] == other["id"], "m1's second job waits; m2's runs"
    assert store.claim_job("host-3") is None
    store.finish_job(first["id"], "succeeded")
    assert store.claim_job("host-3")["id"] == second["id"]


def test_a_database_that_cannot_be_reached_is_named(tmp_path):
    pytest.importorskip("psycopg")
    with pytest.raises(DatabaseError, match=r"127\.0\.0\.1:9/nothing.*cannot connect"):
        Store(Home(tmp_path / "home"), "postgresql://imgclf:secret@127.0.0.1:9/nothing")
    with pytest.raises(DatabaseError) as raised:
        Store(Home(tmp_path / "home"), "postgresql://imgclf:secret@127.0.0.1:9/nothing")
    assert "secret" not in str(raised.value), "the password is not repeated in the message"
    with pytest.raises(SettingsError, match="--db mysql://x: expected postgresql://"):
        Store(Home(tmp_path / "home"), "mysql://x")
