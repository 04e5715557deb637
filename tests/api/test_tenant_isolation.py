"""Tenants are isolated in numbers: nothing one principal sends can change another's
adapter, optimizer state or the base model. A request that yields a non-finite loss fails
for its own run only and changes no weights (the failure mode seen on an open Tinker
server: one user's out-of-vocabulary token turned every tenant's adapters into NaN)."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.api.helpers import TEXTS, TINY, outputs_logprobs, service, sft_datum

ADAM = types.AdamParams(learning_rate=1e-2)


def _logprobs(trainer, tok) -> list[np.ndarray]:
    batch = [sft_datum(tok, t) for t in TEXTS]
    return outputs_logprobs(trainer.forward(batch, "cross_entropy").result())


def test_one_tenants_poisoned_requests_leave_every_other_adapter_and_the_base_intact(server):
    alice, bob = service(server, server.create_key()), service(server, server.create_key())
    victim = bob.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    attacker = alice.create_lora_training_client(base_model=TINY, rank=4, seed=4).result()
    tok = victim.get_tokenizer()
    batch = [sft_datum(tok, t) for t in TEXTS]
    for _ in range(2):
        victim.forward_backward(batch, "cross_entropy").result()
        victim.optim_step(ADAM).result()
    base = bob.create_sampling_client(base_model=TINY).result()
    prompt = types.ModelInput.from_ints(tok.encode(TEXTS[0]))
    victim_before = _logprobs(victim, tok)
    base_before = base.compute_logprobs(prompt).result()
    attacker_before = _logprobs(attacker, tok)

    ids = tok.encode(TEXTS[1])
    oov = types.Datum(model_input=types.ModelInput.from_ints([*ids[:-2], len(tok) + 100]),
                      loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
        attacker.forward_backward([oov], "cross_entropy").result()
    # Huge weights never reach the worker: screening refuses them as gradient ascent.
    huge = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:],
                                       "weights": [3.0e38] * (len(ids) - 1)})
    with pytest.raises(tinker.PermissionDeniedError, match="gradient_ascent"):
        attacker.forward_backward([huge], "cross_entropy").result()
    # Finite sampling logprobs whose importance ratio overflows to inf in the worker.
    n = len(ids) - 1
    overflow = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                           loss_fn_inputs={"target_tokens": ids[1:], "logprobs": [-3.0e38] * n,
                                           "advantages": [1.0] * n})
    with pytest.raises(tinker.RequestFailedError, match="not finite"):
        attacker.forward_backward([overflow], "importance_sampling").result()
    attacker.optim_step(ADAM).result()  # nothing was accumulated: a no-op step
    with pytest.raises(tinker.BadRequestError, match="learning_rate"):
        attacker.optim_step(types.AdamParams(learning_rate=1e30)).result()

    for before, after in zip(victim_before, _logprobs(victim, tok), strict=True):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(attacker_before, _logprobs(attacker, tok), strict=True):
        np.testing.assert_array_equal(before, after)
    assert base.compute_logprobs(prompt).result() == base_before
    # Both runs keep training normally.
    victim.forward_backward(batch, "cross_entropy").result()
    victim.optim_step(ADAM).result()
    assert all(np.isfinite(lp).all() for lp in _logprobs(victim, tok))
    alice.close("success").result()
    bob.close("success").result()
