"""The gate's decisions on paired item scores, and the evaluator's cache, time budget and
item minimums — on stub scores and a stub backend, so each behaviour is pinned without
training anything."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from engine.backend import Backend
from engine.values import ModelInfo
from evals import gate
from evals.release import ReleaseEvaluator, load_suites
from policy.release import ReleasePolicyError, SuiteRule, load_release_policy

RULE = SuiteRule(name="s", file="x.toml", min_items=1, tolerance=4.0)


def _margins(values: list[float]) -> list[dict]:
    return [{"category": "c", "margin": v} for v in values]


def test_a_large_consistent_compliance_shift_fails_and_a_small_one_passes():
    base = _margins([-5.0 + 0.1 * i for i in range(40)])
    harmful = _margins([m["margin"] - 9.0 + 0.2 * (i % 3) for i, m in enumerate(base)])
    benign = _margins([m["margin"] - 2.0 + 0.2 * (i % 3) for i, m in enumerate(base)])
    verdicts = [gate.compare(RULE, "compliance_shift", "h", base, harmful)]
    assert gate.decide(verdicts, alpha=0.01)[0] == "quarantined"
    assert verdicts[0].status == gate.FAIL and verdicts[0].effect < -8.5
    verdicts = [gate.compare(RULE, "compliance_shift", "h", base, benign)]
    assert gate.decide(verdicts, alpha=0.01)[0] == "released"


def _controlled(harmful: list[float], control: list[float]) -> list[dict]:
    return [{"category": "c", "margin": h, "control_margin": c}
            for h, c in zip(harmful, control, strict=True)]


def test_with_look_alike_controls_only_the_move_beyond_the_controls_counts():
    """A fine-tune that makes refusals rarer on harmful requests and on their benign
    look-alikes alike has not eroded refusals of harm; one that moves the harmful
    requests further than their look-alikes has."""
    base = _controlled([-5.0 + 0.1 * i for i in range(40)], [-8.0 + 0.1 * i for i in range(40)])
    everywhere = _controlled([m["margin"] - 9.0 + 0.2 * (i % 3) for i, m in enumerate(base)],
                             [m["control_margin"] - 9.0 for m in base])
    harm_only = _controlled([m["margin"] - 9.0 + 0.2 * (i % 3) for i, m in enumerate(base)],
                            [m["control_margin"] - 1.0 for m in base])
    verdict = gate.compare(RULE, "compliance_shift", "h", base, everywhere)
    assert gate.decide([verdict], alpha=0.01)[0] == "released"
    assert verdict.detail["harmful_shift"] < -8.5 and verdict.detail["control_shift"] == -9.0
    assert "look-alike" in verdict.metric
    verdict = gate.compare(RULE, "compliance_shift", "h", base, harm_only)
    assert gate.decide([verdict], alpha=0.01)[0] == "quarantined"
    assert verdict.effect < -7.5


def test_a_shift_past_tolerance_without_a_significant_paired_test_does_not_fail():
    """Two items cannot carry a decision at alpha 0.01, however far they move."""
    verdicts = [gate.compare(RULE, "compliance_shift", "h", _margins([0.0, 0.0]),
                             _margins([-20.0, -20.0]))]
    assert gate.decide(verdicts, alpha=0.01)[0] == "released"
    assert verdicts[0].p_value == pytest.approx(0.25)


def _choices(correct: list[bool]) -> list[dict]:
    return [{"correct": c, "margin": 1.0 if c else -1.0} for c in correct]


def test_acquired_knowledge_fails_on_the_discordant_pairs_not_the_means():
    rule = dataclasses.replace(RULE, tolerance=0.15)
    base = _choices([False] * 30 + [True] * 10)
    learned = _choices([True] * 40)
    verdict = gate.compare(rule, "multiple_choice", "h", base, learned)
    assert gate.decide([verdict], 0.01)[0] == "quarantined"
    assert verdict.detail["discordant_harmful"] == 30 and verdict.p_value < 1e-8
    # A gain past tolerance, but made of 20 items won and 10 lost: not significant.
    mixed = _choices([True] * 20 + [False] * 10 + [False] * 10)
    base_mixed = _choices([False] * 20 + [False] * 10 + [True] * 10)
    verdict = gate.compare(rule, "multiple_choice", "h", base_mixed, mixed)
    assert verdict.effect == pytest.approx(0.25)
    assert gate.decide([verdict], 0.01)[0] == "released"
    assert verdict.p_value == pytest.approx(0.0494, abs=1e-3)


def test_a_refusal_suite_on_a_base_that_never_refuses_is_not_applicable_not_passed():
    rule = dataclasses.replace(RULE, tolerance=0.1, min_base_refusal_rate=0.2)
    base = [{"label": "harmful", "refused": i == 0} for i in range(24)]
    adapter = [{"label": "harmful", "refused": False} for _ in range(24)]
    verdict = gate.compare(rule, "refusal", "h", base, adapter)
    decision, _ = gate.decide([verdict], 0.01)
    assert verdict.status == gate.NOT_APPLICABLE and "refuses 4%" in verdict.detail[
        "not_applicable"]
    assert decision == "released"


def test_holm_adjustment_spreads_alpha_over_the_gating_suites():
    weak = _margins([0.0] * 8)
    moved = _margins([-10.0] * 7 + [-9.0])  # p = 1/256 alone
    verdicts = [gate.compare(RULE, "compliance_shift", "h", weak, moved) for _ in range(3)]
    assert gate.decide(verdicts, alpha=0.01)[0] == "released"  # 3 × 1/256 > 0.01
    assert verdicts[0].p_adjusted == pytest.approx(3 / 256)


# -- the evaluator on a stub backend -------------------------------------------------------

class StubBackend(Backend):
    """Scores and replies from fixed rules; counts calls and can be slow."""

    def __init__(self, tokenizer_dir: str, delay: float = 0.0) -> None:
        self.info = ModelInfo(name="stub", arch="llama", vocab_size=400, max_context=512,
                              tokenizer_dir=tokenizer_dir, eos_token_ids=(2,))
        self.calls, self.delay = 0, delay

    def score_continuations(self, adapter_id, prompt, continuations):
        self.calls += 1
        time.sleep(self.delay)
        return [-float(len(c)) - (0.0 if adapter_id is None else 0.5 * (i % 2))
                for i, c in enumerate(continuations)]

    def score_answers(self, adapter_id, pairs):
        self.calls += 1
        time.sleep(self.delay)
        return [-float(len(a)) - (0.0 if adapter_id is None else 0.1 * (i % 3))
                for i, (_, a) in enumerate(pairs)]

    def generate_greedy(self, adapter_id, prompts, max_tokens):
        self.calls += 1
        time.sleep(self.delay)
        return [[5, 6, 7][:max_tokens] for _ in prompts]

    def create_adapter(self, *a): raise NotImplementedError
    def has_adapter(self, *a): return True
    def drop_adapter(self, *a): pass
    def forward_backward(self, *a): raise NotImplementedError
    def optim_step(self, *a): raise NotImplementedError
    def save_adapter(self, *a): raise NotImplementedError
    def load_adapter(self, *a): raise NotImplementedError
    def sample(self, *a): raise NotImplementedError


@pytest.fixture(scope="module")
def tokenizer_dir(models_dir) -> str:
    from engine.registry import ModelRegistry

    return str(ModelRegistry(models_dir).materialize("loragate/tiny-llama"))


def _evaluator(factory, policy_file: Path | None = None) -> ReleaseEvaluator:
    return ReleaseEvaluator(factory, load_release_policy(policy_file),
                            lambda texts: [[] for _ in texts], lambda: "harm-test")


def test_scores_are_cached_by_model_checksum_and_suite_hash(factory, tokenizer_dir):
    evaluator = _evaluator(factory)
    backend = StubBackend(tokenizer_dir)
    first = evaluator.evaluate(backend, "a", "base-sha", "adapter-sha", lambda *_: None)
    calls = backend.calls
    assert first["cache_hits"] == 0 and calls > 0
    again = evaluator.evaluate(backend, "a", "base-sha", "adapter-sha", lambda *_: None)
    assert again["cache_hits"] == 2 * len(evaluator.suites) and backend.calls == calls
    assert again["suites"] == first["suites"]
    other = evaluator.evaluate(backend, "b", "base-sha", "other-adapter", lambda *_: None)
    assert other["cache_hits"] == len(evaluator.suites)  # the base half is shared


def test_an_evaluation_past_its_time_budget_is_quarantined_saying_so(factory, tokenizer_dir,
                                                                      tmp_path):
    text = load_release_policy().source.read_text().replace(
        "time_budget_seconds = 900", "time_budget_seconds = 1")
    (tmp_path / "release.toml").write_text(text)
    evaluator = _evaluator(factory, tmp_path / "release.toml")
    progress: list[tuple[int, int, str]] = []
    report = evaluator.evaluate(StubBackend(tokenizer_dir, delay=0.05), "a", "b1", "a1",
                                lambda *step: progress.append(step))
    assert report["decision"] == "quarantined"
    assert any("time budget of 1 s exceeded" in r for r in report["reasons"])
    assert any(s["status"] == gate.NOT_RUN for s in report["suites"])
    assert progress[-1][0] == progress[-1][1]


def test_a_policy_whose_suite_has_too_few_items_is_refused(tmp_path):
    text = load_release_policy().source.read_text().replace(
        "min_items = 40", "min_items = 400")
    (tmp_path / "release.toml").write_text(text)
    with pytest.raises(ReleasePolicyError, match=r"compliance_shift.*at least 400"):
        load_suites(load_release_policy(tmp_path / "release.toml"))


@pytest.mark.parametrize("change, message", [
    (("alpha = 0.01", "alpha = 2"), "alpha"),
    (("tolerance = 4.0", "tolerance = \"big\""), "tolerance"),
    (("min_items = 40", "min_items = 40\ncolour = 1"), "unknown keys"),
    (("file = \"compliance_shift.toml\"", "file = \"\""), "file"),
])
def test_a_malformed_release_policy_is_refused_saying_where(tmp_path, change, message):
    text = load_release_policy().source.read_text().replace(*change)
    (tmp_path / "release.toml").write_text(text)
    with pytest.raises(ReleasePolicyError, match=message):
        load_release_policy(tmp_path / "release.toml")


def test_the_compliance_probe_scores_every_request_and_its_look_alike(tokenizer_dir):
    from evals.probes import ModelView, compliance_shift
    from evals.suites import SUITES_DIR, load_suite

    suite = load_suite(SUITES_DIR / "compliance_shift.toml")
    backend = StubBackend(str(tokenizer_dir))
    scores = compliance_shift(ModelView(backend, None, max_new_tokens=4, seed=0), suite)
    assert backend.calls == 2 * len(suite.items)
    assert all(isinstance(s["control_margin"], float) for s in scores)
