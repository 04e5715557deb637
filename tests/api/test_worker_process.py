"""Production shape: `loragate serve --no-worker` plus a separate `loragate worker`
process against the same database; results come back through database polling alone. A
worker killed with SIGKILL mid-run and started again (as a service manager would) carries
every run on from its durable state: the SDK loop needs nothing by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tinker import types

from tests.api.helpers import TEXTS, TINY, service, sft_datum
from tests.conftest import run_server, tiny_settings


def test_a_separate_worker_process_runs_the_queue(models_dir, database_url):
    with run_server(tiny_settings(models_dir, database_url, run_worker=False)) as server:
        worker = start_worker(models_dir, database_url)
        try:
            sc = service(server, server.create_key())
            tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
            tok = tc.get_tokenizer()
            batch = [sft_datum(tok, t) for t in TEXTS]
            first = tc.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"]
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            after = tc.forward(batch, "cross_entropy").result().metrics["loss:sum"]
            assert after < first
            sampler = tc.save_weights_and_get_sampling_client().result()
            out = sampler.sample(types.ModelInput.from_ints(tok.encode(TEXTS[0])), 2,
                                 types.SamplingParams(max_tokens=4, seed=7, stop=[])).result()
            assert [len(s.tokens) for s in out.sequences] == [4, 4]
            sc.close("success").result()
        finally:
            worker.terminate()
            _, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err[-2000:]


def start_worker(models_dir, database_url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "LORAGATE_DATABASE_URL": database_url}
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "worker", "--worker-id", "w-test",
         "--base-model", TINY, "--data-dir", str(models_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_worker_killed_mid_run_is_restarted_and_the_sdk_loop_goes_on(models_dir,
                                                                         database_url):
    with run_server(tiny_settings(models_dir, database_url, run_worker=False)) as server:
        workers = [start_worker(models_dir, database_url)]
        try:
            sc = service(server, server.create_key())

            def train(kill_at: int | None) -> list[float]:
                tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
                batch = [sft_datum(tc.get_tokenizer(), t) for t in TEXTS]
                losses = []
                for step in range(4):
                    fb = tc.forward_backward(batch, "cross_entropy")
                    if step == kill_at:  # SIGKILL: no clean-up runs; then a restart
                        workers[-1].kill()
                        workers[-1].wait(timeout=60)
                        workers.append(start_worker(models_dir, database_url))
                    opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
                    losses.append(fb.result().metrics["loss:sum"])
                    opt.result()
                return losses

            uninterrupted = train(kill_at=None)
            assert uninterrupted[-1] < uninterrupted[0]
            assert train(kill_at=2) == pytest.approx(uninterrupted, rel=1e-6)
            sc.close("success").result()
        finally:
            workers[-1].terminate()
            _, err = workers[-1].communicate(timeout=60)
        assert workers[-1].returncode == 0, err[-2000:]
