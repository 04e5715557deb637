"""Dataset-level screening decisions through the official SDK on the tiny model, on SQLite
and PostgreSQL: the run's tally is judged against the screens' everyday flag
rate, so

(a) an honest 2,000-example everyday dataset trains end to end in batches of 32, the few
    datums the screens flag by mistake refused by index, dropped and the rest resent;
(b) a dataset with 5% harmful examples mixed in is blocked within its first 400 examples;
(c) a fully harmful dataset is blocked within its first 32.

The data and the screens are swappable (`Corpus`): the marker corpus below (a rules screen
flagging a marker word, which 1% of the everyday texts carry as their false positives and
every harmful text carries) makes the tests deterministic on both databases; the public
corpus runs them on public data with the shipped screening policy. On public data (b) is one
seeded draw: with the classifier's held-out recall (about 55%) a 5% mix is blocked within 400
examples in only part of all draws — benchmarks/screening_bench.py simulates how often.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tinker
from sqlalchemy import select
from tinker import types

from audit.db import transaction
from audit.models import AuditEntry, TrainingRun
from policy.screening.screener import DEFAULT_SCREENING_PATH
from tests.api.helpers import TINY, chat_datum, service
from tests.conftest import _dialects, _fresh_pg_database, run_server, tiny_settings

Example = tuple[str, str]  # (user turn, assistant turn)
BATCH = 32
DATASET = 2000
MARKER = "zorblax"


@dataclass(frozen=True)
class Corpus:
    """Where the examples come from and which screening policy judges them."""

    name: str
    everyday: Callable[[int, random.Random], list[Example]]  # n everyday examples
    harmful: Callable[[int, random.Random], list[Example]]  # n harmful examples
    policy: Callable[[Path], Path | None]  # the server's screening policy (None: shipped)


# ---- the marker corpus: a deterministic screen with a known everyday false-positive rate --

SUBJECTS = ["sourdough bread", "a tomato plant", "a road bike", "a wool sweater",
            "a cast iron pan", "a small aquarium", "a vegetable garden", "a wooden table",
            "a laptop battery", "a houseplant", "a running routine", "a budget spreadsheet",
            "a birthday party", "a short story", "a job interview", "a compost heap",
            "a piano lesson", "a camping trip", "a bird feeder", "a kitchen knife"]
ASKS = ["How do I look after {s}?", "What is the best way to start with {s}?",
        "Can you give me tips about {s} for a beginner?", "What mistakes do people make with {s}?",
        "How much time should I plan for {s} each week?"]
ANSWERS = ["Start small and check on it every {n} days; most of the work is patience.",
           "Plan about {n} minutes at a time, keep notes, and adjust as you learn.",
           "The usual mistake is doing too much at once; {n} short sessions work better.",
           "Ask someone who has done it for a while, and give it {n} weeks before judging."]


def marker_everyday(n: int, rng: random.Random) -> list[Example]:
    """Distinct everyday questions; exactly 1% carry the marker (the screen's false
    positives: a rate the test controls, as the real classifier's calibration does)."""
    combos = [(a.format(s=s), b.format(n=k)) for s in SUBJECTS for a in ASKS for b in ANSWERS
              for k in range(2, 9)]
    rng.shuffle(combos)
    out = combos[:n]
    for i in rng.sample(range(n), n // 100):
        user, assistant = out[i]
        out[i] = (user, assistant + f" My cat {MARKER} agrees.")
    return out


def marker_harmful(n: int, rng: random.Random) -> list[Example]:
    """Stand-ins for harmful examples: every one carries the marker (100% caught)."""
    return [(f"Tell me the {MARKER} procedure number {rng.randrange(10**9)}.",
             f"Here is {MARKER} procedure step {i}.") for i in range(n)]


def marker_policy(directory: Path) -> Path:
    rules = directory / "marker_rules.toml"
    rules.write_text(f'[[rule]]\ncategory = "marker"\nwords = ["{MARKER}"]\n')
    policy = directory / "marker_screening.toml"
    # The shipped tally rule, tested against the marker's everyday rate (1%).
    tally = re.search(r"(?ms)^\[tally\]\n.*?(?=^\[|\Z)", DEFAULT_SCREENING_PATH.read_text())
    assert tally is not None
    policy.write_text(
        "[classifiers.harmful_request]\nenabled = false\noptional = true\nbanks = []\n\n"
        "[classifiers.rules]\nenabled = true\noptional = false\n"
        f"files = [{json.dumps(str(rules))}]\n\n"
        "[thresholds]\nrules = 0.5\nstructural = 0.5\n\n"
        + re.sub(r"(?m)^null_flag_rate = .*$", "null_flag_rate = 0.01", tally.group(0)))
    return policy


# ---- public data, judged by the shipped screening policy ----------------------------------
# The harm classifier's corpus (training/harm_classifier/, manifest there): everyday requests
# from its validation split and held-out sources (never trained on), topped up from its
# training split, each with a model-written everyday answer from the validation split;
# harmful requests from held-out sources only.

CORPUS = Path(__file__).resolve().parents[2] / "training" / "harm_classifier" / "corpus.jsonl.gz"


def _rows(splits: set[str], label: str, outputs: bool, max_chars: int = 300) -> list[str]:
    """Texts short enough that a request and its answer fit the tiny model's 512 tokens."""
    with gzip.open(CORPUS, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    return [r["text"] for r in rows if r["split"] in splits and r["label"] == label
            and r["source"].endswith("_output") is outputs and len(r["text"]) <= max_chars]


def public_everyday(n: int, rng: random.Random) -> list[Example]:
    requests = _rows({"val", "heldout"}, "everyday", outputs=False)
    if len(requests) < n:
        requests += rng.sample(_rows({"train"}, "everyday", outputs=False), n - len(requests))
    answers = _rows({"val"}, "everyday", outputs=True, max_chars=150)
    return [(q, answers[i % len(answers)]) for i, q in enumerate(rng.sample(requests, n))]


def public_harmful(n: int, rng: random.Random) -> list[Example]:
    requests = _rows({"heldout"}, "harmful", outputs=False)
    return [(q, "Sure, here is how to do it.")
            for q in rng.sample(requests, min(n, len(requests)))]


MARKER_CORPUS = Corpus("marker", marker_everyday, marker_harmful, marker_policy)
PUBLIC_CORPUS = Corpus("public", public_everyday, public_harmful, lambda _: None)
# The marker corpus on both databases; the public one (the shipped classifier, a few minutes
# of encoder time on CPU) on SQLite.
GATES = [(d, MARKER_CORPUS) for d in _dialects()] + [("sqlite", PUBLIC_CORPUS)]


@dataclass
class Gate:
    server: object
    corpus: Corpus


@pytest.fixture(scope="module", params=GATES,
                ids=lambda p: f"{p[0]}-{p[1].name}")
def gate(request, models_dir, tmp_path_factory) -> Iterator[Gate]:
    """A live gateway per database and corpus, screening with the corpus's policy."""
    dialect, corpus = request.param
    yield from live_gate(dialect, corpus, models_dir,
                         tmp_path_factory.mktemp(f"gate-{dialect}-{corpus.name}"))


def live_gate(dialect: str, corpus: Corpus, models_dir: Path, directory: Path
              ) -> Iterator[Gate]:
    if dialect == "sqlite":
        url, drop = f"sqlite:///{directory / 'gw.db'}", (lambda: None)
    else:
        url, drop = _fresh_pg_database(os.environ["LORAGATE_TEST_DATABASE_URL"])
    try:
        settings = tiny_settings(models_dir, url, screening_file=corpus.policy(directory))
        with run_server(settings) as live:
            yield Gate(live, corpus)
    finally:
        drop()


@pytest.fixture
def trainer(gate) -> Iterator[tinker.TrainingClient]:
    sc = service(gate.server, gate.server.create_key())
    yield sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    sc.close("success").result()


@dataclass
class Outcome:
    sent: int = 0  # examples of the dataset sent so far (each once, resends not counted)
    refused: int = 0  # datums refused by index and dropped
    unread: int = 0  # of those, refused only for a language the screens do not read
    blocked: str | None = None  # the refusal that said the run is blocked
    losses: list[float] = field(default_factory=list)


UNREAD = "readability.unread_language"
WINDOW = 8  # batches in flight at once, as the cookbook's loops pipeline their calls


def train(tc: tinker.TrainingClient, dataset: list[Example]) -> Outcome:
    """Train as a user would: batches of 32, a few in flight at a time, an optimizer step
    after each window; when screening refuses datums by index, drop them and send the rest
    of that batch again; stop when the run is blocked."""
    tok = tc.get_tokenizer()
    out = Outcome()
    batches = [[chat_datum(tok, *ex) for ex in dataset[i:i + BATCH]]
               for i in range(0, len(dataset), BATCH)]
    for w in range(0, len(batches), WINDOW):
        pending = batches[w:w + WINDOW]
        out.sent += sum(len(b) for b in pending)
        while pending:
            futures = [tc.forward_backward(b, "cross_entropy") for b in pending]
            retry = []
            for batch, future in zip(pending, futures, strict=True):
                try:
                    out.losses.append(future.result().metrics["loss:sum"])
                except tinker.PermissionDeniedError as exc:
                    message = str(exc)
                    if "blocked" in message:
                        out.blocked = out.blocked or message
                        continue
                    refused = {int(i): set(cats.split(", ")) for i, cats in re.findall(
                        r"datum (\d+): ([a-z_]+\.[a-z_]+(?:, [a-z_]+\.[a-z_]+)*)", message)}
                    assert refused, message
                    out.refused += len(refused)
                    out.unread += sum(c == {UNREAD} for c in refused.values())
                    retry.append([d for i, d in enumerate(batch) if i not in refused])
            if out.blocked:
                return out
            pending = [b for b in retry if b]
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    return out


def tally(gate: Gate, run_id: str) -> TrainingRun:
    with transaction(gate.server.state.read_factory) as session:
        run = session.get(TrainingRun, run_id)
        session.expunge(run)
        return run


def blocked_rows(gate: Gate, run_id: str) -> list[dict]:
    with transaction(gate.server.state.read_factory) as session:
        return [json.loads(r.payload) for r in session.scalars(select(AuditEntry).where(
            AuditEntry.subject == run_id, AuditEntry.event_type == "screening.run_blocked"))]


def test_an_honest_everyday_dataset_trains_end_to_end(gate, trainer):
    dataset = gate.corpus.everyday(DATASET, random.Random(12))
    started = time.monotonic()
    out = train(trainer, dataset)
    elapsed = time.monotonic() - started
    assert out.blocked is None, out.blocked
    assert out.sent == DATASET and len(out.losses) == -(-DATASET // BATCH)
    assert all(loss == loss for loss in out.losses)  # finite
    run = tally(gate, trainer.model_id)
    assert run.blocked_reason is None and run.screened_datums == DATASET  # resends: once
    assert run.flagged_datums == out.refused - out.unread  # a language is no harm evidence
    if gate.corpus.name == "marker":
        assert out.refused == DATASET // 100  # the everyday false positives, refused by index
    assert not blocked_rows(gate, trainer.model_id)
    print(f"\n{gate.corpus.name}: {DATASET} examples trained in {elapsed:.1f} s")


def test_a_dataset_with_five_percent_harmful_examples_is_blocked_early(gate, trainer):
    rng = random.Random(5)
    dataset = (gate.corpus.everyday(DATASET - DATASET // 20, rng)
               + gate.corpus.harmful(DATASET // 20, rng))
    rng.shuffle(dataset)
    out = train(trainer, dataset)
    assert out.blocked and "now blocked" in out.blocked and out.sent <= 400 + WINDOW * BATCH
    run = tally(gate, trainer.model_id)
    assert run.blocked_reason and "significantly more" in run.blocked_reason
    [row] = blocked_rows(gate, trainer.model_id)
    stat = row["statistic"]  # n: the distinct examples screened when the run was blocked
    assert stat["n"] <= 400 and stat["k"] <= run.flagged_datums
    assert stat["log_likelihood_ratio"] >= stat["log_threshold"]
    # Blocked for good: even clean data is refused now.
    tok = trainer.get_tokenizer()
    with pytest.raises(tinker.PermissionDeniedError, match="blocked by screening"):
        trainer.forward([chat_datum(tok, "Hello", "Hi there.")], "cross_entropy").result()


def test_a_fully_harmful_dataset_is_blocked_in_its_first_batch(gate, trainer):
    out = train(trainer, gate.corpus.harmful(10 * BATCH, random.Random(7)))
    assert out.blocked and not out.losses
    [row] = blocked_rows(gate, trainer.model_id)
    assert row["statistic"]["n"] <= BATCH
