"""Scale-out on PostgreSQL: two API processes and two worker processes share one database,
four SDK clients train at once. Each run's jobs go to one worker (its lease); when that
worker is killed, the other takes its runs over from durable state once the lease lapses,
and every client's loop goes on without anything done by hand."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import tinker
from sqlalchemy import select
from tinker import types

from audit.db import make_engine, make_sessionmaker, transaction
from audit.models import Future, TrainingRun
from gateway.embedded import serve_in_subprocess
from tests.api.helpers import TEXTS, TINY, sft_datum

LEASE_SECONDS = 3.0


def cli(*args: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, check=True,
                          text=True, capture_output=True).stdout.strip()


@contextlib.contextmanager
def worker(worker_id: str, models_dir, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "worker", "--worker-id", worker_id,
         "--base-model", TINY, "--data-dir", str(models_dir),
         "--lease-seconds", str(LEASE_SECONDS)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


def train(url: str, key: str, steps: int, client: dict) -> None:
    """One researcher's loop; keeps its training client in `client` for a second phase."""
    if "tc" not in client:
        sc = tinker.ServiceClient(base_url=url, api_key=key)
        client["tc"] = sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
        client["losses"] = []
    tc = client["tc"]
    batch = [sft_datum(tc.get_tokenizer(), t) for t in TEXTS]
    for _ in range(steps):
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        client["losses"].append(fb.result().metrics["loss:sum"])
        opt.result()


def all_train(urls: list[str], keys: list[str], steps: int, clients: list[dict]) -> None:
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            train(urls[i % len(urls)], keys[i], steps, clients[i])
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors


def workers_by_run(database_url: str) -> dict[str, list[str]]:
    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            rows = session.execute(select(Future.model_id, Future.worker_id).where(
                Future.model_id.is_not(None)).order_by(Future.model_id, Future.seq_id)).all()
            leased = {run: holder for run, holder in session.execute(
                select(TrainingRun.id, TrainingRun.lease_worker_id))}
    finally:
        engine.dispose()
    out: dict[str, list[str]] = {}
    for model_id, worker_id in rows:
        out.setdefault(model_id, []).append(worker_id)
    return {run: [*ids, f"lease:{leased.get(run)}"] for run, ids in out.items()}


def test_two_api_processes_and_two_workers_share_one_postgres(models_dir, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("several processes on one queue need PostgreSQL")
    env = {**os.environ, "LORAGATE_DATABASE_URL": database_url}
    keys = [cli("keys", "create", "--role", "researcher", "--owner", f"r{i}", "--data-dir",
                str(models_dir), env=env) for i in range(4)]
    api = ["--no-worker", "--base-model", TINY]
    clients: list[dict] = [{} for _ in keys]
    with serve_in_subprocess(models_dir, env=env, args=api, start_timeout=120) as url_a, \
            serve_in_subprocess(models_dir, env=env, args=api, start_timeout=120) as url_b, \
            worker("w-a", models_dir, env) as proc_a, worker("w-b", models_dir, env) as proc_b:
        all_train([url_a, url_b], keys, 2, clients)
        before = workers_by_run(database_url)
        for run, ids in before.items():  # each run's jobs went to the worker holding it
            assert len(set(ids[:-1])) == 1 and ids[-1] == f"lease:{ids[0]}", (run, ids)

        victim = next(iter(before.values()))[0]  # holds at least one run
        survivor = "w-b" if victim == "w-a" else "w-a"
        proc = proc_a if victim == "w-a" else proc_b
        proc.kill()  # SIGKILL: its runs must move to the survivor once its lease lapses
        proc.wait(timeout=60)
        all_train([url_a, url_b], keys, 2, clients)

    after = workers_by_run(database_url)
    moved = [run for run, ids in before.items() if ids[0] == victim]
    assert moved
    for run in moved:
        ids = after[run]
        assert ids[-1] == f"lease:{survivor}", ids
        assert ids[len(before[run]) - 1:-1] == [survivor] * 4, ids
    for client in clients:
        losses = client["losses"]
        assert len(losses) == 4 and losses[-1] < losses[0]
