"""The validated value objects (engine.values): a malformed datum, sampling request,
optimizer step or loss call cannot be built, so no later layer checks it again; the one
check left to the engine is that ids fit the model, and every path into the model runs it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.errors import UserInputError
from engine.torch_backend import TorchBackend
from engine.values import (
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    AdamStep,
    LoraSpec,
    ModelInfo,
    SampleSpec,
    TrainingDatum,
    check_data_fits,
    check_loss_inputs,
    resolve_config,
)

TOKENS = np.arange(1, 7, dtype=np.int64)
ONES = np.ones(6, np.float32)
INFO = ModelInfo(name="m", arch="llama", vocab_size=100, max_context=8, tokenizer_dir="")


def datum(**changes) -> TrainingDatum:
    inputs = {"target_tokens": TOKENS + 1, "weights": ONES}
    tokens = changes.pop("tokens", TOKENS)
    return TrainingDatum(tokens, {**inputs, **changes})


@pytest.mark.parametrize("changes", [
    {"weights": np.array([1, np.nan, 1, 1, 1, 1], np.float32)},
    {"weights": np.full(6, np.inf, np.float32)},
    {"weights": np.full(6, 1e300)},  # finite in float64, not in float32
    {"weights": np.array(["a"] * 6)},
    {"tokens": TOKENS.astype(np.float32)},
    {"target_tokens": np.stack([TOKENS, TOKENS], 1)},
    {"weights": np.ones(5, np.float32)},
    {"tokens": np.array([], np.int64)},
])
def test_a_malformed_datum_cannot_be_built(changes):
    with pytest.raises(UserInputError):
        datum(**changes)


def test_a_datum_holds_canonical_dtypes():
    built = TrainingDatum([1, 2, 3], {"target_tokens": [2, 3, 4], "advantages": [1, 0, 2]})
    assert built.tokens.dtype == np.int64
    assert built.loss_inputs["target_tokens"].dtype == np.int64
    assert built.loss_inputs["advantages"].dtype == np.float32


@pytest.mark.parametrize("data,loss_fn", [
    ([], "cross_entropy"),
    ([TrainingDatum(TOKENS, {"target_tokens": TOKENS, "logprobs": ONES})], "ppo"),
    ([datum(mask=ONES)], "cross_entropy"),
])
def test_a_loss_call_needs_its_inputs_and_no_others(data, loss_fn):
    with pytest.raises(UserInputError):
        check_loss_inputs(data, loss_fn)


@pytest.mark.parametrize("loss_fn,config", [
    ("custom", {}), ("stable_reinforce", {}), ("gspo", {"beta": 0.1}),
    ("cross_entropy", {"beta": 1.0}),
    ("ppo", {"clip_low_threshold": 1.5}), ("dro", {"beta": float("nan")}), ("dro", {"beta": "x"}),
])
def test_a_loss_config_outside_the_loss_definition_is_refused(loss_fn, config):
    with pytest.raises(UserInputError):
        resolve_config(loss_fn, config)


@pytest.mark.parametrize("changes", [
    {"rank": 0}, {"rank": 2.0}, {"rank": True}, {"seed": -1},
    {"train_attn": False, "train_mlp": False, "train_unembed": False},
    {"train_mlp": "yes"},
])
def test_an_invalid_lora_spec_cannot_be_built(changes):
    with pytest.raises(UserInputError):
        LoraSpec(**{"rank": 4, **changes})


@pytest.mark.parametrize("changes", [
    {"learning_rate": -1.0}, {"beta1": 1.0}, {"beta2": 1.5}, {"eps": float("nan")},
    {"eps": 0.0},  # the policy refused it and the engine took it: one rule now
    {"grad_clip_norm": float("inf")}, {"weight_decay": -0.1}, {"learning_rate": True},
])
def test_an_invalid_adam_step_cannot_be_built(changes):
    with pytest.raises(UserInputError, match="adam_params"):
        AdamStep(**changes)


@pytest.mark.parametrize("changes", [
    {"prompt": ()},
    {"prompt": (1, 2.5)},
    {"max_tokens": 0},
    {"num_samples": 0},
    {"temperature": -0.5},
    {"temperature": float("nan")},
    {"top_k": 0},  # the wire refused it and the engine took it: one rule now
    {"top_k": -2},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"seed": -1},
    {"topk_sample_logprobs": 10_000},
    {"stop_strings": ("",)},
    {"stop_strings": ("x" * (MAX_STOP_LENGTH + 1),)},
    {"stop_token_ids": tuple(range(MAX_STOP_SEQUENCES + 1))},
    {"stop_token_ids": (1.5,)},
])
def test_an_invalid_sampling_request_cannot_be_built(changes):
    with pytest.raises(UserInputError):
        SampleSpec(**{"prompt": (1, 2, 3), **changes})


@pytest.mark.parametrize("build", [
    lambda: check_data_fits([datum(tokens=np.array([1, 2, 3, 4, 5, 100]))], INFO),
    lambda: check_data_fits([datum(target_tokens=np.array([-1, 2, 3, 4, 5, 6]))], INFO),
    lambda: check_data_fits([TrainingDatum(np.ones(9, np.int64),
                                           {"target_tokens": np.ones(9, np.int64)})], INFO),
    lambda: SampleSpec(prompt=(1, 2, 100)).check_fits(INFO),
    lambda: SampleSpec(prompt=(1, 2), stop_token_ids=(-3,)).check_fits(INFO),
    lambda: SampleSpec(prompt=(1, 2), max_tokens=7).check_fits(INFO),
])
def test_ids_outside_the_model_are_refused_at_the_edge(build):
    with pytest.raises(UserInputError, match=r"vocabulary|context"):
        build()


def test_ids_inside_the_model_fit():
    check_data_fits([datum(tokens=np.array([0, 2, 3, 4, 5, 99]))], INFO)
    SampleSpec(prompt=(0, 99), max_tokens=6, stop_token_ids=(99,)).check_fits(INFO)


class GuardHit(Exception):
    pass


def test_every_path_into_the_model_runs_the_engines_one_guard(backend: TorchBackend,
                                                              monkeypatch):
    """forward/backward, sampling and the evaluation helpers all check ids through
    `TorchBackend.guard`; nothing reaches the model around it."""
    def guard(self, ids, what, generated=0):
        raise GuardHit(what)

    monkeypatch.setattr(TorchBackend, "guard", guard)
    paths = {
        "forward": lambda: backend.forward_backward(None, [datum()], "cross_entropy", {}, True),
        "sample": lambda: backend.sample(None, SampleSpec(prompt=(1, 2, 3), max_tokens=2)),
        "score": lambda: backend.score_continuations(None, [1, 2], [[3], [4, 5]]),
        "answers": lambda: backend.score_answers(None, [([1, 2], [3])]),
        "greedy": lambda: backend.generate_greedy(None, [[1, 2]], 2),
    }
    for call in paths.values():
        with pytest.raises(GuardHit):
            call()


def test_a_replaced_field_is_validated_again():
    with pytest.raises(UserInputError):
        dataclasses.replace(SampleSpec(prompt=(1, 2)), temperature=-1.0)


@pytest.mark.parametrize("shape, dense", [
    ([-2, -3], np.ones(6, "<f4").tobytes()),  # a product that matches, of negative sizes
    ([2], b"\x00" * 5),  # bytes that are not whole float32 values
    ([3], np.ones(2, "<f4").tobytes()),
])
def test_a_tensor_whose_bytes_do_not_fill_its_shape_is_a_user_error(shape, dense):
    from tinker.proto import tinker_public_pb2 as pb

    from engine import wire

    msg = pb.ForwardBackwardRequest(model_id="m", loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.arange(1, 3, dtype="<i4").tobytes()
    targets = datum.loss_fn_inputs["target_tokens"]
    targets.dtype, targets.dense = pb.DTYPE_INT64, np.arange(2, 4, dtype="<i8").tobytes()
    targets.shape.append(2)
    weights = datum.loss_fn_inputs["weights"]
    weights.dtype, weights.dense = pb.DTYPE_FLOAT32, dense
    weights.shape.extend(shape)
    with pytest.raises(UserInputError, match="weights"):
        wire.decode_forward_backward(msg.SerializeToString())


# -- 2-D (N, K) targets ------------------------------------------------------------------------

TARGETS_2D = np.stack([TOKENS + 1, TOKENS + 2, TOKENS + 3], 1)
WEIGHTS_2D = np.full((6, 3), 1 / 3, np.float32)


def test_a_two_d_cross_entropy_datum_is_built_and_checked_in_every_column():
    built = datum(target_tokens=TARGETS_2D, weights=WEIGHTS_2D)
    assert built.candidates == 3 and built.loss_inputs["weights"].shape == (6, 3)
    check_loss_inputs([built], "cross_entropy")
    check_data_fits([built], INFO)
    outside = TARGETS_2D.copy()
    outside[4, 2] = 100  # only the last column leaves the vocabulary
    with pytest.raises(UserInputError, match="token id 100"):
        check_data_fits([datum(target_tokens=outside, weights=WEIGHTS_2D)], INFO)


@pytest.mark.parametrize("changes, field", [
    ({"target_tokens": TARGETS_2D, "weights": ONES}, "weights"),  # (N,) weights for (N, K)
    ({"target_tokens": TARGETS_2D, "weights": WEIGHTS_2D[:, :2]}, "weights"),
    ({"target_tokens": TARGETS_2D[:5], "weights": WEIGHTS_2D[:5]}, "target_tokens"),
    ({"target_tokens": np.ones((6, 101), np.int64), "weights": np.ones((6, 101), np.float32)},
     "target_tokens"),  # K above the limit
    ({"target_tokens": np.ones((6, 0), np.int64), "weights": np.ones((6, 0), np.float32)},
     "target_tokens"),
    ({"target_tokens": np.ones((6, 2, 2), np.int64)}, "target_tokens"),
    ({"advantages": np.ones((6, 2), np.float32)}, "advantages"),  # only targets/weights
])
def test_a_malformed_two_d_datum_names_the_field(changes, field):
    with pytest.raises(UserInputError, match=field):
        datum(**changes)


def test_two_d_targets_are_for_cross_entropy_only():
    rl = TrainingDatum(TOKENS, {"target_tokens": TARGETS_2D, "logprobs": ONES,
                                "advantages": ONES})
    with pytest.raises(UserInputError, match=r"target_tokens.*cross_entropy only, not by ppo"):
        check_loss_inputs([rl], "ppo")


def _two_d_request(loss_fn: str = "cross_entropy", weights=None):
    """A forward_backward body as the SDK encodes it: 2-D torch tensors for target_tokens
    and weights become sparse CSR when that is smaller (tinker/types/datum.py)."""
    import torch
    from tinker import types as tt
    from tinker.proto.request_conv import forward_backward_request_to_proto

    targets = torch.zeros((6, 3), dtype=torch.long)
    targets[2:, 0], targets[4, 1] = torch.arange(5, 9), 42
    w = torch.zeros((6, 3)) if weights is None else weights
    w[2:, 0], w[4, 1] = 0.5, 0.25
    sdk = tt.Datum(model_input=tt.ModelInput.from_ints(list(range(1, 7))),
                   loss_fn_inputs={"target_tokens": targets, "weights": w})
    request = tt.ForwardBackwardRequest(
        model_id="m", seq_id=1,
        forward_backward_input=tt.ForwardBackwardInput(data=[sdk], loss_fn=loss_fn))
    msg = forward_backward_request_to_proto(request)
    return msg, targets.numpy(), w.numpy()


def test_sparse_csr_two_d_targets_from_the_sdk_are_densified():
    from engine import wire

    msg, targets, weights = _two_d_request()
    assert msg.data[0].loss_fn_inputs["target_tokens"].WhichOneof("encoding") == "sparse_csr"
    call = wire.decode_forward_backward(msg.SerializeToString(), INFO)
    np.testing.assert_array_equal(call.data[0].loss_inputs["target_tokens"], targets)
    np.testing.assert_array_equal(call.data[0].loss_inputs["weights"], weights)


@pytest.mark.parametrize("corrupt, match", [
    (lambda t: t.shape.__setitem__(0, 10**9), "shape"),  # a declared shape cannot allocate
    (lambda t: t.shape.__setitem__(1, 10**6), "shape"),
    (lambda t: setattr(t.sparse_csr, "col_indices",
                       np.full(len(t.sparse_csr.col_indices) // 8, 7, "<i8").tobytes()),
     "column index"),
    (lambda t: setattr(t.sparse_csr, "crow_indices", np.zeros(7, "<i8").tobytes()),
     "row pointers"),
    (lambda t: setattr(t.sparse_csr, "values", b"\x00" * 3), "byte lengths"),
])
def test_malformed_sparse_csr_is_a_user_error_naming_the_field(corrupt, match):
    from engine import wire

    msg, _, _ = _two_d_request()
    corrupt(msg.data[0].loss_fn_inputs["target_tokens"])
    with pytest.raises(UserInputError, match=f"target_tokens.*{match}"):
        wire.decode_forward_backward(msg.SerializeToString())
