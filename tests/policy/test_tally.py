"""The dataset-level screening decision (policy.screening.tally): a run is blocked when
its flagged share of distinct datums is significantly above the everyday flag rate p0
(mixture SPRT, anytime false-alarm bound alpha), or when its high-confidence flags reach
the cap, or when most completions open affirmatively. The tally counts each distinct
datum once (SQLite and PostgreSQL). Also the simulation benchmarks use."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from sqlalchemy import func, select

from audit.db import transaction
from audit.models import (
    AuditEntry,
    ClientSession,
    Principal,
    PrincipalTallyDatum,
    ScreeningTallyDatum,
    TrainingRun,
)
from benchmarks.screening_sim import simulate
from policy.errors import PolicyError
from policy.screening.harmful_requests import ScreenLoadError
from policy.screening.screener import load_config
from policy.screening.tally import (
    PrincipalBlocked,
    PrincipalNotFound,
    TallyCounts,
    alternatives,
    binomial_tail,
    check_principal_not_blocked,
    datum_marks,
    decide,
    log_likelihood_ratio,
    log_likelihood_ratios,
    min_flags_to_block,
    record_principal_tally,
    record_tally,
    reinstate_principal,
    share_test,
)

CONFIG = load_config()  # the shipped policy: p0 = 0.01, p0h = 0.001, alpha = 1e-3
LIMITS = CONFIG.tally


def limits(p0: float = 0.01, **kw):
    """The shipped limits with two cells (high-confidence flags counted as flags)."""
    return dataclasses.replace(LIMITS, null_flag_rate=p0, **{"null_high_confidence_rate": 0.0,
                                                             **kw})


# Two cells: n distinct screened, k flagged, p0 → blocked?
SHARE_TABLE = [
    (0, 0, 0.01, False),
    (1, 1, 0.01, False),
    (2, 2, 0.01, False),  # two in a row happen to honest runs (1e-4 each start)…
    (3, 3, 0.01, True),  # …three of three essentially never
    (32, 4, 0.01, False),
    (32, 5, 0.01, True),  # a first batch with 5 flags
    (100, 3, 0.01, False),  # the old fixed limit (3 per run) blocked this honest run
    (100, 7, 0.01, False),
    (100, 8, 0.01, True),
    (400, 14, 0.01, False),
    (400, 15, 0.01, True),
    (400, 24, 0.01, True),  # 5% harmful caught + 1% everyday flags
    (2000, 20, 0.01, False),  # exactly the everyday rate
    (2000, 30, 0.01, False),  # 1.5x it, by chance or a slightly harder dataset
    (2000, 41, 0.01, False),
    (2000, 42, 0.01, True),
    (100_000, 1000, 0.01, False),
    (100_000, 1500, 0.01, True),
    (100, 8, 0.05, False),  # the same counts against a screen that flags 5% of everyday data
    (100, 20, 0.05, True),
]


@pytest.mark.parametrize(("n", "k", "p0", "blocked"), SHARE_TABLE)
def test_the_share_test(n, k, p0, blocked):
    stats = share_test(n, k, limits(p0))
    assert stats["significant"] is blocked
    assert (decide(TallyCounts(n, k, 0), limits(p0)) is not None) is blocked
    assert (stats["log_likelihood_ratio"] >= math.log(1 / LIMITS.alpha)) is blocked


def test_blocking_counts_grow_with_the_run_and_a_smaller_alpha_asks_for_more():
    sizes = (3, 32, 100, 400, 1000, 2000)
    assert [min_flags_to_block(n, limits()) for n in sizes] == [3, 5, 8, 15, 27, 42]
    assert min_flags_to_block(2, limits()) is None
    assert min_flags_to_block(400, limits(alpha=1e-6)) > 15
    # Three cells (the shipped policy): flags below high confidence need one more on long
    # runs (the mixture has more alternatives to pay for)...
    assert [min_flags_to_block(n, LIMITS) for n in sizes] == [3, 5, 8, 16, 28, 43]
    # ...and high-confidence flags, which everyday data reaches at most 0.1% of the time,
    # need far fewer: 4 of 100 (8 otherwise), 6 of 400 (16 otherwise).
    assert min_flags_to_block(100, LIMITS, high=4) == 4
    assert min_flags_to_block(400, LIMITS, high=6) == 6
    assert min_flags_to_block(2000, LIMITS, high=6) == 43  # 2 expected in 2,000: no evidence


# Three cells: n distinct screened, k flagged, h of them with high confidence → blocked?
JOINT_TABLE = [
    (3, 2, 2, True),  # two of the first three with high confidence (3e-6 for honest data)
    (3, 2, 0, False),
    (32, 2, 2, False),
    (32, 3, 3, True),  # three of the first batch with high confidence
    (32, 5, 0, True),
    (100, 3, 3, False),
    (100, 4, 4, True),
    (100, 6, 3, False),
    (400, 5, 5, False),
    (400, 6, 6, True),
    (400, 12, 4, False),
    (400, 15, 4, True),
    (400, 15, 0, False),
    (2000, 30, 2, False),  # 1.5x the everyday rate, and its share of high confidence
    (2000, 20, 8, False),
]


@pytest.mark.parametrize(("n", "k", "high", "blocked"), JOINT_TABLE)
def test_the_share_test_weighs_high_confidence_flags(n, k, high, blocked):
    stats = share_test(n, k, LIMITS, high)
    assert stats["significant"] is blocked and stats["high_confidence"] == high
    block = decide(TallyCounts(n, k, high), LIMITS)
    assert (block is not None) is blocked
    if block and high:
        assert f"{k} of {n} distinct training datums flagged ({high} with high confidence)" \
            in block.reason


def test_every_alternative_keeps_the_test_valid_for_any_honest_run():
    """Ville's bound holds when each alternative's expected likelihood-ratio factor is at
    most 1 for every honest cell distribution (flag rate <= p0, high-confidence rate <=
    p0h): the factor is linear in it, so it is enough that it is 1 at the null's corner and
    that the alternative raises high confidence at least as much as other flags, and
    those at least as much as clean datums."""
    p0, p0h = LIMITS.null_flag_rate, LIMITS.null_high_confidence_rate
    pairs = alternatives(LIMITS)
    assert len(pairs) >= len(LIMITS.alternative_ratios)
    for qm, qh in pairs:
        clean, mid, high = (1 - qm - qh) / (1 - p0), qm / (p0 - p0h), qh / p0h
        assert high >= mid >= 1 >= clean > 0 and high > 1
        assert (1 - p0) * clean + (p0 - p0h) * mid + p0h * high == pytest.approx(1)
    # The same numbers element-wise for the simulation.
    n, k, h = np.array([400, 2000, 3]), np.array([15, 30, 2]), np.array([4, 2, 2])
    assert log_likelihood_ratios(n, k, h, LIMITS) == pytest.approx(
        [log_likelihood_ratio(int(a), int(b), int(c), LIMITS)
         for a, b, c in zip(n, k, h, strict=True)])
    with pytest.raises(ValueError, match="high <= k"):
        log_likelihood_ratio(10, 2, 3, LIMITS)


def test_the_audit_statistic_reports_the_exact_binomial_tail_for_readers():
    assert binomial_tail(10, 1, 0.1) == pytest.approx(1 - 0.9**10)
    assert binomial_tail(10, 0, 0.1) == 1.0 and binomial_tail(10, 11, 0.1) == 0.0
    stats = share_test(100, 8, LIMITS)
    assert stats["binomial_tail_p"] < 1e-4 and stats["p0"] == 0.01
    assert stats["log_threshold"] == pytest.approx(math.log(1000), abs=1e-3)


@pytest.mark.parametrize(("high", "blocked"), [(0, False), (24, False), (25, True)])
def test_the_high_confidence_cap_blocks_whatever_the_share(high, blocked):
    assert LIMITS.high_confidence_cap == 25  # the shipped cap
    block = decide(TallyCounts(100_000, high, high), LIMITS)
    assert (block is not None) is blocked
    if block:
        assert "high confidence" in block.reason and block.statistic["high_confidence"] == 25


@pytest.mark.parametrize(("openers", "completions", "blocked"),
                         [(5, 7, False), (4, 8, False), (5, 8, True), (60, 100, True)])
def test_the_affirmative_opener_rule_stays(openers, completions, blocked):
    counts = TallyCounts(completions, 0, 0, openers, completions)
    assert (decide(counts, LIMITS) is not None) is blocked


def test_the_policy_file_is_checked(tmp_path):
    text = (load_config.__globals__["DEFAULT_SCREENING_PATH"]).read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("alpha = 1e-3", "alpha = 0"))
    with pytest.raises(ScreenLoadError, match="alpha"):
        load_config(bad)
    bad.write_text(text.replace("null_high_confidence_rate = 0.001",
                                "null_high_confidence_rate = 0.02"))
    with pytest.raises(ScreenLoadError, match="below null_flag_rate"):
        load_config(bad)
    bad.write_text(text.replace("high_confidence_ratios = [1.0, 4.0, 16.0]",
                                "high_confidence_ratios = [0.5]"))
    with pytest.raises(ScreenLoadError, match="high_confidence_ratios"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text(text + 'rules = 0.9\n"harmful_request.weapons" = 0.4\n')
    config = load_config(good)
    assert config.high_confidence_threshold("rules.lab_secrets") == 0.9
    assert config.high_confidence_threshold("harmful_request.weapons") == 0.4
    assert config.high_confidence_threshold("harmful_request.cyber") is None


# ---- the tally in SQL: each distinct datum once -------------------------------------------

@pytest.fixture
def run_id(factory):
    with transaction(factory) as session:
        session.add(Principal(id="p1", name="alice", role="researcher"))
        session.flush()
        session.add(ClientSession(id="s1", principal_id="p1"))
        session.flush()
        session.add(TrainingRun(id="s1:train:0", session_id="s1", model_seq_id=0,
                                principal_id="p1", base_model="fake", lora_rank=4,
                                lora_config="{}", status="active"))
    return "s1:train:0"


def add(factory, run_id, digests, flagged=(), scores=None, config=CONFIG,
        affirmative=0, completions=None):
    scores = scores or {i: {"rules.marker": 1.0} for i in flagged}
    with transaction(factory) as session:
        run, block = record_tally(session, run_id, datum_sha256=list(digests),
                                  flagged=list(flagged), flag_scores=scores,
                                  affirmative=affirmative,
                                  completions=len(digests) if completions is None
                                  else completions, config=config, actor="p1",
                                  request_id="req-1")
        return (run.screened_datums, run.flagged_datums, run.high_confidence_flags,
                run.blocked_reason, block)


def d(i: int) -> str:
    return f"{i:064x}"


def test_resubmitted_datums_are_counted_once(factory, run_id):
    assert add(factory, run_id, [d(i) for i in range(32)], flagged=[3])[:3] == (32, 1, 0)
    # The same batch again (an RL loop), and without the refused datum (as a user resends).
    assert add(factory, run_id, [d(i) for i in range(32)], flagged=[3])[:3] == (32, 1, 0)
    assert add(factory, run_id, [d(i) for i in range(32) if i != 3])[:3] == (32, 1, 0)
    # Repeats within one batch count once too; new datums count.
    assert add(factory, run_id, [d(40)] * 5 + [d(41)])[:3] == (34, 1, 0)
    with transaction(factory) as session:
        assert session.scalar(select(func.count()).select_from(ScreeningTallyDatum)) == 34


def test_padding_with_repeats_does_not_dilute_the_share(factory, run_id):
    clean = [d(i) for i in range(100, 129)]
    assert add(factory, run_id, [*clean, d(1), d(2), d(3)], flagged=[29, 30, 31])[3] is None
    for _ in range(50):  # 1,450 resent clean datums: n stays 32
        assert add(factory, run_id, clean)[:2] == (32, 3)
    n, k, _, reason, block = add(factory, run_id, [d(4), d(5), d(6)], flagged=[0, 1, 2])
    assert (n, k) == (35, 6) and block is not None and reason == block.reason
    assert "6 of 35 distinct training datums flagged" in reason
    with transaction(factory) as session:
        [row] = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "screening.run_blocked")).all()
    payload = json.loads(row.payload)
    assert row.subject == run_id and row.request_id == "req-1"
    assert payload["statistic"]["n"] == 35 and payload["statistic"]["k"] == 6
    assert payload["statistic"]["log_likelihood_ratio"] >= payload["statistic"]["log_threshold"]
    # A blocked run is blocked once: later batches add to the tally, no second audit row.
    assert add(factory, run_id, [d(7)], flagged=[0])[4] is None


def test_a_datum_first_clean_then_flagged_moves_once(factory, run_id):
    assert add(factory, run_id, [d(1), d(2)])[:2] == (2, 0)
    assert add(factory, run_id, [d(1), d(2)], flagged=[0])[:2] == (2, 1)
    assert add(factory, run_id, [d(1)], flagged=[0])[:2] == (2, 1)


def test_high_confidence_flags_count_distinct_datums_toward_the_cap(factory, run_id):
    config = dataclasses.replace(CONFIG, high_confidence_thresholds={"rules.marker": 0.9},
                                 tally=dataclasses.replace(LIMITS, high_confidence_cap=2))
    clean = [d(i) for i in range(1000, 1998)]
    low = {0: {"rules.marker": 0.5}}
    assert add(factory, run_id, clean, config=config)[:3] == (998, 0, 0)
    assert add(factory, run_id, [d(1)], flagged=[0], scores=low, config=config)[:3] == (999, 1, 0)
    first = add(factory, run_id, [d(2), d(2)], flagged=[0, 1], config=config)
    assert first[:3] == (1000, 2, 1) and first[3] is None
    assert add(factory, run_id, [d(2)], flagged=[0], config=config)[2:4] == (1, None)
    blocked = add(factory, run_id, [d(3)], flagged=[0], config=config)
    assert blocked[2] == 2 and "high confidence" in blocked[3]


def test_three_high_confidence_flags_in_a_first_batch_block_the_run(factory, run_id):
    """Stored high-confidence counts reach the share test: 3 of 32 flagged block the run
    when all three are flagged with high confidence (5 are needed otherwise), long before
    the cap."""
    config = dataclasses.replace(CONFIG, high_confidence_thresholds={"rules.marker": 0.9})
    low = {i: {"rules.marker": 0.5} for i in (0, 1, 2)}
    assert add(factory, run_id, [d(i) for i in range(32)], flagged=[0, 1, 2], scores=low,
               config=config)[3] is None
    n, k, high, reason, block = add(factory, run_id, [d(i) for i in range(100, 132)],
                                    flagged=[0, 1, 2], config=config)
    assert (n, k, high) == (64, 6, 3) and block is not None
    assert reason == "6 of 64 distinct training datums flagged (3 with high confidence), " \
        "significantly more than everyday data produces"
    assert block.statistic["high_confidence"] == 3 and block.statistic["p0_high_confidence"] \
        == LIMITS.null_high_confidence_rate


def test_affirmative_openers_count_new_datums_only(factory, run_id):
    batch = [d(i) for i in range(8)]
    assert add(factory, run_id, batch, affirmative=4)[3] is None  # 4 of 8: not above half
    for _ in range(3):  # resending the openers does not add them again
        assert add(factory, run_id, batch[:4], affirmative=4)[3] is None
    blocked = add(factory, run_id, [d(8), d(9)], affirmative=2)  # 6 of 10
    assert "affirmative prefix" in blocked[3]


# ---- the simulation -------------------------------------------------------------------------

def test_the_simulation_reports_honest_false_alarms_and_time_to_block():
    poisoned = simulate(LIMITS, honest_fpr=0.01, harmful_tpr=0.8, harmful_share=0.05,
                        batch_size=32, n_examples=1000, runs=300, seed=1)
    assert poisoned.honest_blocked <= 0.01  # the bound is alpha = 0.001
    assert poisoned.poisoned_blocked > 0.95
    assert 96 <= poisoned.median_examples_to_block <= 400
    assert poisoned.median_examples_to_block % 32 == 0  # judged after each batch
    assert poisoned.p95_examples_to_block >= poisoned.median_examples_to_block
    # At the classifier's measured rates (61% of held-out harmful requests flagged, 42% of
    # those with high confidence; 1% of everyday ones, 7% of those), weighing
    # high-confidence flags apart blocks more 5%-poisoned runs within 400 examples than
    # counting them as flags, and no more honest ones.
    rates = dict(honest_fpr=0.01, harmful_tpr=0.61, harmful_share=0.05, honest_high=0.07,
                 harmful_high=0.42, n_examples=400, runs=2000, seed=2)
    joint, flat = simulate(LIMITS, **rates), simulate(limits(), **rates)
    assert joint.poisoned_blocked > flat.poisoned_blocked + 0.06  # about 0.75 against 0.65
    assert joint.honest_blocked <= 0.005 and flat.honest_blocked <= 0.005
    # Honest data at the null's corner (1% flagged, 0.1% with high confidence) is blocked
    # at most alpha of the time, here with alpha = 5% to see it.
    corner = simulate(dataclasses.replace(LIMITS, alpha=0.05), honest_fpr=0.01,
                      honest_high=0.1, harmful_tpr=1.0, harmful_share=1.0, n_examples=2000,
                      runs=1000, seed=3)
    assert corner.honest_blocked <= 0.065
    full = simulate(LIMITS, honest_fpr=0.01, harmful_tpr=1.0, harmful_share=1.0,
                    batch_size=32, n_examples=320, runs=50)
    assert full.median_examples_to_block == full.p95_examples_to_block == 32
    miscalibrated = simulate(LIMITS, honest_fpr=0.05, harmful_tpr=1.0, harmful_share=1.0,
                             n_examples=1000, runs=100)
    assert miscalibrated.honest_blocked > 0.9  # p0 must be the everyday rate
    weak = simulate(LIMITS, honest_fpr=0.01, harmful_tpr=0.1, harmful_share=0.02,
                    n_examples=500, runs=100)
    assert weak.median_examples_to_block is None  # most such runs are not caught


# ---- the person's tally: every run and dry run of theirs, each distinct datum once --------

def add_for_person(factory, digests, flagged=(), where="dry run"):
    with transaction(factory) as session:
        marks = datum_marks(list(digests), list(flagged),
                            {i: {"rules.marker": 1.0} for i in flagged}, CONFIG)
        person, block = record_principal_tally(session, "p1", marks=marks, config=CONFIG,
                                               actor="p1", request_id="req-2", where=where,
                                               judge=where != "dry run")
        return (person.screened_datums, person.flagged_datums,
                person.screening_blocked_reason, block)


def test_a_person_tally_sums_runs_and_dry_runs_and_counts_a_datum_once(factory, run_id):
    """Each run and dry run stays under its own bar (4 of 32 flagged), but the evidence adds
    up in the person's tally: a new run or a dry run does not start it afresh."""
    assert add_for_person(factory, [d(i) for i in range(32)], flagged=[0, 1, 2, 3])[:3] \
        == (32, 4, None)
    # The same datums trained after their dry run (the flagged ones dropped) add nothing.
    assert add_for_person(factory, [d(i) for i in range(4, 32)], where="training run r")[:2] \
        == (32, 4)
    n, k, reason, block = add_for_person(factory, [d(i) for i in range(100, 132)],
                                         flagged=[0, 1, 2, 3], where="training run r2")
    assert (n, k) == (64, 8) and block is not None
    assert reason == "8 of 64 distinct datums screened for this person flagged, " \
        "significantly more than everyday data produces"
    with transaction(factory) as session:
        [row] = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "screening.principal_blocked")).all()
        assert session.scalar(select(func.count()).select_from(PrincipalTallyDatum)) == 64
        with pytest.raises(PrincipalBlocked, match="alice is blocked by screening"):
            check_principal_not_blocked(session.get(Principal, "p1"))
    payload = json.loads(row.payload)
    assert row.subject == "p1" and payload["where"] == "training run r2"
    assert payload["statistic"]["n"] == 64 and payload["statistic"]["k"] == 8
    # Blocked once: more flags add to the tally without a second block or audit row.
    assert add_for_person(factory, [d(200)], flagged=[0])[3] is None


def test_an_honest_persons_everyday_flags_never_block_them(factory, run_id):
    """1 flag in 100 (the everyday rate) over 2,000 datums, in batches from many runs."""
    for start in range(0, 2000, 100):
        assert add_for_person(factory, [d(i) for i in range(start, start + 100)],
                              flagged=[start % 97])[2] is None


def test_a_persons_tally_has_no_absolute_cap(factory, run_id):
    """3 high-confidence flags in 3,000 datums: the everyday high-confidence rate, over a
    person's many runs; a run's cap (2 here) would block one run, never the person."""
    config = dataclasses.replace(CONFIG, high_confidence_thresholds={"rules.marker": 0.9},
                                 tally=dataclasses.replace(LIMITS, high_confidence_cap=2))
    for start in range(0, 3000, 1000):
        with transaction(factory) as session:
            marks = datum_marks([d(i) for i in range(start, start + 1000)], [7],
                                {7: {"rules.marker": 1.0}}, config)
            person, block = record_principal_tally(session, "p1", marks=marks, config=config,
                                                   actor="p1", where="training run")
    assert (person.screened_datums, person.high_confidence_flags) == (3000, 3)
    assert block is None and person.screening_blocked_reason is None
    assert decide(TallyCounts(3000, 3, 3), config.tally) is not None  # a run's cap


def test_a_dry_run_counts_but_is_judged_with_the_next_training_batch(factory, run_id):
    assert add_for_person(factory, [d(i) for i in range(3)], flagged=[0, 1, 2])[2:] \
        == (None, None)
    n, k, reason, block = add_for_person(factory, [d(0)], flagged=[0], where="training run")
    assert (n, k) == (3, 3) and block is not None and reason


def test_an_admin_reinstates_a_blocked_person_and_their_tally_starts_afresh(factory, run_id):
    add_for_person(factory, [d(i) for i in range(3)], flagged=[0, 1, 2], where="training run")
    with transaction(factory) as session:
        session.add(Principal(id="a1", name="admin", role="admin"))
        assert session.get(Principal, "p1").screening_blocked_reason
    with transaction(factory) as session, pytest.raises(PolicyError, match="yourself"):
        reinstate_principal(session, "p1", actor="p1", reason="fine")
    with transaction(factory) as session, pytest.raises(PrincipalNotFound):
        reinstate_principal(session, "nobody", actor="a1", reason="fine")
    with transaction(factory) as session:
        person = reinstate_principal(session, "p1", actor="a1", reason="reviewed: typos",
                                     request_id="req-3")
        assert (person.screened_datums, person.flagged_datums) == (0, 0)
        check_principal_not_blocked(person)
        [row] = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "screening.principal_reinstated")).all()
    payload = json.loads(row.payload)
    assert row.actor == "a1" and payload["reason"] == "reviewed: typos"
    assert payload["before"]["flagged"] == 3 and payload["before"]["blocked_reason"]
    # Afresh: the same flagged datums count again.
    assert add_for_person(factory, [d(0)], flagged=[0])[:2] == (1, 1)
