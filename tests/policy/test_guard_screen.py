"""The guard screen on tiny random models built here (no downloads): a Llama guard LM in
every prompt format and a Llama sequence classifier load from a local directory only when
their weights match the pinned SHA-256 (single file or shards), score in [0, 1]
deterministically, judge long texts in windows (one score, the maximum over windows), and
wire through `Screener.build` as `guard.<category>` scores and flags."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from policy.digest import file_sha256, files_sha256
from policy.screening.guard import GuardScreen, load_guard, token_windows, weight_files
from policy.screening.harmful_requests import ScreenLoadError
from policy.screening.screener import Screener, load_config

ANSWER_WORDS = ["unsafe", "safe", "Yes", "No"]
LABELS = {0: "benign", 1: "harmful", 2: "violent"}


def _tiny_tokenizer():
    from engine.registry import _build_tiny_tokenizer

    tokenizer = _build_tiny_tokenizer()
    tokenizer.add_tokens(ANSWER_WORDS)  # each answer word one token, as in real guards
    return tokenizer


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=1024, initializer_range=0.2,
                       pad_token_id=tokenizer.pad_token_id, **extra)


def build_guard_lm(out: Path, **save) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(_llama_config(tokenizer))
    model.save_pretrained(out, **save)
    tokenizer.save_pretrained(out)
    return out


def build_guard_classifier(out: Path) -> Path:
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = _tiny_tokenizer()
    config = _llama_config(tokenizer, num_labels=len(LABELS), id2label=LABELS,
                           label2id={v: k for k, v in LABELS.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return build_guard_lm(tmp_path_factory.mktemp("guard-lm"))


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory) -> Path:
    return build_guard_classifier(tmp_path_factory.mktemp("guard-clf"))


def pin(directory: Path) -> str:
    return files_sha256(weight_files(directory))


def spec(directory: Path, **extra) -> dict:
    return {"enabled": True, "optional": False, "directory": str(directory),
            "sha256": pin(directory), "device": "cpu", **extra}


TEXTS = ["hello, how are you today?", "tell me how to hurt someone", ""]


@pytest.mark.parametrize("fmt", ["llama_guard", "shieldgemma", "granite_guardian",
                                 "chat_template"])
def test_a_guard_lm_scores_p_unsafe_in_every_format(lm_dir, fmt):
    screen = load_guard(spec(lm_dir, format=fmt), "cpu")
    assert screen.name == "guard" and screen.categories == ("unsafe",)
    assert screen.applies_to == frozenset({"request", "completion", "output"})
    assert fmt in screen.version and pin(lm_dir)[:12] in screen.version
    scores = screen.score(TEXTS)
    assert len(scores) == len(TEXTS)
    assert all(set(s) == {"unsafe"} and 0.0 <= s["unsafe"] <= 1.0 for s in scores)
    assert "tell me how to hurt someone" in screen.prompt("tell me how to hurt someone")
    # Same text, same score — alone or batched with others.
    assert screen.score([TEXTS[1]]) == [scores[1]]
    assert screen.score(TEXTS) == scores


def test_the_score_is_p_unsafe_over_the_two_answer_tokens_after_the_prompt(lm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    screen = load_guard(spec(lm_dir, format="llama_guard"), "cpu")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    text = "how do I sharpen a kitchen knife?"
    ids = tokenizer.encode(screen.prompt(text), add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    unsafe, safe = (tokenizer.convert_tokens_to_ids(w) for w in ("unsafe", "safe"))
    expected = torch.softmax(logits[[unsafe, safe]], -1)[0].item()
    # Batched with a longer text (padding) it is the same number.
    scores = screen.score([text, text + " and then " * 40])
    assert scores[0]["unsafe"] == pytest.approx(expected, abs=1e-4)


def test_formats_and_answer_words_give_distinct_versions(lm_dir):
    a = load_guard(spec(lm_dir, format="llama_guard"), "cpu")
    b = load_guard(spec(lm_dir, format="shieldgemma"), "cpu")
    c = load_guard(spec(lm_dir, format="llama_guard", unsafe_token="Yes", safe_token="No"),
                   "cpu")
    assert len({a.version, b.version, c.version}) == 3
    assert a.score(["a question"]) != c.score(["a question"])


def test_an_answer_word_of_several_tokens_is_refused(lm_dir):
    with pytest.raises(ScreenLoadError, match="not one"):
        load_guard(spec(lm_dir, unsafe_token="definitely harmful"), "cpu")


def test_a_sequence_classifier_scores_each_label(clf_dir):
    screen = load_guard(spec(clf_dir, kind="sequence_classifier"), "cpu")
    assert screen.categories == ("benign", "harmful", "violent")
    scores = screen.score(TEXTS)
    for s in scores:
        assert set(s) == set(LABELS.values()) and all(0.0 <= v <= 1.0 for v in s.values())
    assert screen.score([TEXTS[0]]) == [scores[0]]
    restricted = load_guard(spec(clf_dir, kind="sequence_classifier", activation="sigmoid",
                                 unsafe_labels=["harmful", "violent"]), "cpu")
    assert restricted.categories == ("harmful", "violent")
    assert all(set(s) == {"harmful", "violent"} for s in restricted.score(TEXTS))
    assert restricted.version != screen.version
    with pytest.raises(ScreenLoadError, match="not labels of the model"):
        load_guard(spec(clf_dir, kind="sequence_classifier", unsafe_labels=["nope"]), "cpu")


def test_a_wrong_pin_refuses_naming_the_file_and_its_digest(lm_dir):
    weights = lm_dir / "model.safetensors"
    actual = file_sha256(weights)
    with pytest.raises(ScreenLoadError) as refused:
        load_guard({**spec(lm_dir), "sha256": "0" * 64}, "cpu")
    assert str(weights) in str(refused.value) and actual in str(refused.value)
    with pytest.raises(ScreenLoadError, match="pin the SHA-256") as unpinned:
        load_guard({**spec(lm_dir), "sha256": ""}, "cpu")
    assert actual in str(unpinned.value)


def test_sharded_weights_are_pinned_shard_by_shard(tmp_path):
    directory = build_guard_lm(tmp_path / "sharded", max_shard_size="40KB")
    shards = weight_files(directory)
    assert len(shards) > 1 and not (directory / "model.safetensors").exists()
    by_file = {p.name: file_sha256(p) for p in shards}
    assert load_guard({**spec(directory), "sha256": by_file}, "cpu").score(["hi"])
    assert load_guard(spec(directory), "cpu").score(["hi"])  # one digest over all shards
    bad = {**by_file, shards[-1].name: "f" * 64}
    with pytest.raises(ScreenLoadError) as refused:
        load_guard({**spec(directory), "sha256": bad}, "cpu")
    assert str(shards[-1]) in str(refused.value) and by_file[shards[-1].name] in str(
        refused.value)


def test_a_missing_directory_or_unknown_kind_refuses(tmp_path, lm_dir):
    missing = tmp_path / "no-such-guard"
    with pytest.raises(ScreenLoadError, match="no-such-guard"):
        load_guard({"directory": str(missing), "sha256": "0" * 64}, "cpu")
    with pytest.raises(ScreenLoadError, match="directory"):
        load_guard({"sha256": "0" * 64}, "cpu")
    with pytest.raises(ScreenLoadError, match="kind"):
        load_guard(spec(lm_dir, kind="oracle"), "cpu")
    with pytest.raises(ScreenLoadError, match="format"):
        load_guard(spec(lm_dir, format="vibes"), "cpu")


def test_long_texts_are_judged_in_windows_max_over_windows(lm_dir, clf_dir):
    long_text = " ".join(f"sentence {i} talks about the weather and the sea." for i in
                         range(120))
    for directory, kind in ((lm_dir, "causal_lm"), (clf_dir, "sequence_classifier")):
        screen = load_guard(spec(directory, kind=kind, max_tokens=64), "cpu")
        assert isinstance(screen, GuardScreen)
        pieces = screen.windows(long_text)
        assert len(pieces) > 5
        [score] = screen.score([long_text])
        each = screen.score(pieces)
        for category in screen.categories:
            assert score[category] == pytest.approx(max(s[category] for s in each), abs=2e-4)
        assert screen.score([long_text]) == [score]


def test_token_windows_cover_everything_with_overlap():
    ids = list(range(100))
    windows = token_windows(ids, 30, 5)
    assert all(len(w) <= 30 for w in windows)
    assert sorted(set().union(*map(set, windows))) == ids
    assert all(a[-5:] == b[:5] for a, b in itertools.pairwise(windows))
    assert token_windows([1, 2], 30) == [[1, 2]] and token_windows([], 30) == [[]]


def test_the_screener_builds_the_guard_and_flags_by_its_threshold(factory, lm_dir, tmp_path):
    config = load_config()
    guard_only = {"guard": spec(lm_dir)}  # every other configurable classifier off
    low = dataclasses.replace(config, classifiers=guard_only,
                              thresholds={**config.thresholds, "guard": 0.0})
    screener = Screener.build(low, factory)
    active = {c["name"]: c for c in screener.describe()["active"]}
    assert active["guard"]["categories"] == ["unsafe"]
    assert "guard.unsafe" in screener.categories()
    [verdict] = screener.screen(["a harmless question about the sea"])
    assert 0.0 <= verdict.scores["guard.unsafe"] <= 1.0
    assert "guard.unsafe" in verdict.flagged
    high = dataclasses.replace(low, thresholds={**config.thresholds, "guard": 1.01})
    [verdict] = Screener.build(high, factory).screen(["a harmless question about the sea"])
    assert "guard.unsafe" in verdict.scores and "guard.unsafe" not in verdict.flagged
    broken = dataclasses.replace(config, classifiers={
        "guard": {**spec(lm_dir), "directory": str(tmp_path / "gone")}})
    with pytest.raises(ScreenLoadError, match="gone"):
        Screener.build(broken, factory)
    optional = dataclasses.replace(config, classifiers={
        "guard": {**spec(lm_dir), "sha256": "0" * 64, "optional": True}})
    assert "guard" in Screener.build(optional, factory).describe()["inactive"]
