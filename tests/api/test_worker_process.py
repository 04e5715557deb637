"""Production shape: `loragate serve --no-worker` plus a separate `loragate worker`
process against the same database; results come back through database polling alone."""

from __future__ import annotations

import os
import subprocess
import sys

from tinker import types

from tests.api.helpers import TEXTS, TINY, service, sft_datum
from tests.conftest import run_server, tiny_settings


def test_a_separate_worker_process_runs_the_queue(models_dir, database_url):
    with run_server(tiny_settings(models_dir, database_url, run_worker=False)) as server:
        env = {**os.environ, "LORAGATE_DATABASE_URL": database_url}
        worker = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker", "--worker-id", "w-test",
             "--base-model", TINY, "--data-dir", str(models_dir)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
