"""The screener: the classifiers policy names, their per-category thresholds, and the
verdict cache every process shares.

Built once per process from the screening policy (`default_screening.toml` or the
operator's file). A classifier that cannot load stops start-up with a message naming the
missing file, unless policy marks it optional; either way `describe()` says what is
active, for the start-up audit row. Each classifier names the parts it judges (request
turns, trained completions, sampled outputs) and `screen` asks only those. Scores are
cached by (content SHA-256, classifier version) in SQL, so a text — an RL prompt sent
again and again — is scored once.
Thresholds come from the policy file, overridden per category by audited admin edits —
except for the release gate's judge of generated replies (`judge_outputs`,
`output_judge`), which reads the reviewed policy file's output thresholds only: one admin's
run-time edit neither silences the gate's suites nor voids their calibrated bounds.

Must not import fastapi or engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import transaction
from audit.models import ScreeningThreshold, ScreeningVerdict
from policy.errors import LimitExceeded
from policy.screening import readable, structural
from policy.screening.guard import load_guard
from policy.screening.harm_classifier import load as load_harm_classifier
from policy.screening.harmful_requests import (
    HarmfulRequestScreen,
    MiniLM,
    ScreenLoadError,
    load_banks,
    read_toml,
)
from policy.screening.rules import RuleScreen
from policy.screening.toxicity import ToxicityScreen

DEFAULT_SCREENING_PATH = Path(__file__).resolve().parents[1] / "default_screening.toml"
logger = logging.getLogger("loragate.screening")


# The parts of traffic a classifier can judge: request turns (every untrained context turn
# of a training datum, every turn of a sampling prompt), completions (text a datum trains
# toward) and sampled outputs.
REQUEST, COMPLETION, OUTPUT = "request", "completion", "output"
PARTS = frozenset({REQUEST, COMPLETION, OUTPUT})
# What a classifier reads: each text as written, in its canonical form (obfuscation undone,
# policy.screening.readable) and with each encoded word decoded, keeping the highest score
# per category (the default), or only the canonical form.
BOTH, CANONICAL = "as written, canonical and words decoded", "canonical"
UNREAD_LANGUAGE = "unread_language"
ENCODED_WORDS = "encoded_words"


class Classifier(Protocol):
    """A screen. Optional attributes: `reads` (BOTH unless it says CANONICAL) and
    `tallied` (False when its flags refuse a datum without counting toward the run's
    tally)."""

    name: str
    version: str
    categories: tuple[str, ...]
    applies_to: frozenset[str]  # which of PARTS it judges

    def score(self, texts: list[str]) -> list[dict[str, float]]: ...


class StructuralScreen:
    """Text-level structural signals as a classifier (1.0 when the signal fires), on each
    text as written (look-alike letters are themselves a signal) and in canonical form (an
    identity-shift prompt in leetspeak is still one)."""

    name = "structural"
    version = "structural-v2"
    categories: tuple[str, ...] = (structural.ENCODED, structural.PERSONA)
    applies_to = PARTS

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        out = []
        for text in texts:
            scores = dict.fromkeys(self.categories, 0.0)
            for signal in (structural.encoded_text(text), structural.persona_shift(text)):
                if signal is not None:
                    scores[signal.category] = 1.0
            out.append(scores)
        return out


class ReadabilityScreen:
    """Text the screens cannot read: in a language they do not read
    (`unread_language`, 1.0 when a window of a text's prose is confidently in a language
    outside `languages`), or English encoded word by word (`encoded_words`, 1.0 when a
    window reads as English only once each word is decoded: pig latin, scrambled letters;
    `readable.word_encoded`). The content classifiers read English words, so such text is
    refused rather than trained unread, and a sampled output is withheld rather than let
    out unread (an English prompt that passes the screens may ask for its answer in another
    language). Its flags refuse the datum but do not count toward the run's tally: they
    say nothing about harm."""

    name = "readability"
    categories: tuple[str, ...] = (UNREAD_LANGUAGE, ENCODED_WORDS)
    applies_to = PARTS
    reads = CANONICAL
    tallied = False

    def __init__(self, languages: Sequence[str], min_confidence: float) -> None:
        if not languages or not all(isinstance(x, str) and x for x in languages):
            raise ScreenLoadError("classifiers.readability.languages must list language "
                                  "codes (ISO 639-1, e.g. \"en\")")
        if not 0.0 < min_confidence <= 1.0:
            raise ScreenLoadError("classifiers.readability.min_confidence must lie in (0, 1]")
        self.languages = tuple(sorted(set(languages)))
        self.min_confidence = min_confidence
        self.version = (f"readability-v4+py3langid-{metadata.version('py3langid')}:"
                        f"{','.join(self.languages)}@{min_confidence:g}")

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        return [{UNREAD_LANGUAGE: float(readable.language(t, self.languages,
                                                          self.min_confidence) is not None),
                 ENCODED_WORDS: float(readable.word_encoded(t))}
                for t in texts]


@dataclass(frozen=True)
class TallyLimits:
    """The policy file's [tally]: how a run's cumulative screening tally is judged
    (policy.screening.tally explains the test and its error rate)."""

    null_flag_rate: float  # p0: the screens' calibrated flag rate on everyday data
    alpha: float  # bound on an honest run's chance of ever being blocked by the share test
    alternative_ratios: tuple[float, ...]  # flag rates (× p0) the share test is built to catch
    high_confidence_cap: int  # distinct high-confidence flagged datums that block a run
    affirmative_share: float
    affirmative_min_completions: int
    max_loss_weight: float
    max_abs_advantage: float
    # p0h: the calibrated rate of high-confidence flags on everyday data (0: the share test
    # counts them as ordinary flags), and the factors by which the share test's
    # alternatives raise the high-confidence rate faster than the flag rate.
    null_high_confidence_rate: float = 0.0
    high_confidence_ratios: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class ScreeningConfig:
    classifiers: dict[str, dict[str, Any]]
    thresholds: dict[str, float]
    output_thresholds: dict[str, float]
    tally: TallyLimits
    sha256: str
    # [high_confidence_thresholds]: a flagged score at or above its category's value is a
    # high-confidence flag (counted against the tally's absolute cap); keyed like thresholds.
    high_confidence_thresholds: dict[str, float] = field(default_factory=dict)

    def threshold(self, key: str, overrides: dict[str, float], output: bool = False) -> float:
        """For "classifier.category": an admin override, the file's per-category value,
        the file's classifier default, else 0.5 — for sampled outputs, the file's output
        thresholds come first."""
        classifier = key.split(".", 1)[0]
        sources = [(overrides, key)]
        if output:
            sources += [(self.output_thresholds, key), (self.output_thresholds, classifier)]
        sources += [(self.thresholds, key), (self.thresholds, classifier)]
        for source, name in sources:
            if name in source:
                return float(source[name])
        return 0.5

    def high_confidence_threshold(self, key: str) -> float | None:
        """For "classifier.category": the file's per-category value, else its classifier's,
        else None (that category's flags never count as high-confidence)."""
        for name in (key, key.split(".", 1)[0]):
            if name in self.high_confidence_thresholds:
                return self.high_confidence_thresholds[name]
        return None


def _tally_limits(data: dict[str, Any]) -> TallyLimits:
    ratios: dict[str, tuple[float, ...]] = {
        name: tuple(float(r) for r in data[name])
        for name in ("alternative_ratios", "high_confidence_ratios") if name in data}
    tally = TallyLimits(**{**data, **ratios})
    if not 0.0 < tally.null_flag_rate < 1.0 or not 0.0 < tally.alpha < 1.0:
        raise ValueError("[tally] null_flag_rate and alpha must lie between 0 and 1")
    if not tally.alternative_ratios or min(tally.alternative_ratios) <= 1.0:
        raise ValueError("[tally] alternative_ratios must be a list of numbers above 1")
    if min(tally.alternative_ratios) * tally.null_flag_rate >= 1.0:
        raise ValueError("[tally] the smallest of alternative_ratios times null_flag_rate "
                         "must be a flag rate below 1")
    if not 0.0 <= tally.null_high_confidence_rate < tally.null_flag_rate:
        raise ValueError("[tally] null_high_confidence_rate must be at least 0 and below "
                         "null_flag_rate (high-confidence flags are flags)")
    if not tally.high_confidence_ratios or min(tally.high_confidence_ratios) < 1.0:
        raise ValueError("[tally] high_confidence_ratios must be a list of numbers of at "
                         "least 1")
    if tally.high_confidence_cap < 1:
        raise ValueError("[tally] high_confidence_cap must be at least 1")
    return tally


def load_config(path: Path | None = None) -> ScreeningConfig:
    path = path or DEFAULT_SCREENING_PATH
    raw, data = read_toml(path, "screening policy file")
    try:
        tally = _tally_limits(data["tally"])
        return ScreeningConfig(
            classifiers=data.get("classifiers", {}),
            thresholds={k: float(v) for k, v in data["thresholds"].items()},
            output_thresholds={k: float(v) for k, v in data.get("output_thresholds", {}).items()},
            tally=tally, sha256=hashlib.sha256(raw).hexdigest(),
            high_confidence_thresholds={k: float(v) for k, v in
                                        data.get("high_confidence_thresholds", {}).items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise ScreenLoadError(f"screening policy {path} is not usable: {exc}") from exc


@dataclass
class Verdict:
    """One text: the categories it is flagged in ("classifier.category") and every score."""

    flagged: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # "classifier.category" → score
    thresholds: dict[str, float] = field(default_factory=dict)  # of the flagged categories

    def evidence(self) -> dict[str, dict[str, float]]:
        """For the audit trail (never the caller): each flagged score and its threshold."""
        return {k: {"score": self.scores[k], "threshold": self.thresholds[k]}
                for k in self.flagged}


def content_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Screener:
    def __init__(self, classifiers: Sequence[Classifier], config: ScreeningConfig,
                 factory: sessionmaker[Session], inactive: dict[str, str] | None = None
                 ) -> None:
        self.classifiers = list(classifiers)
        self.config = config
        self.factory = factory
        self.inactive = inactive or {}

    @classmethod
    def build(cls, config: ScreeningConfig, factory: sessionmaker[Session],
              device: str = "cpu") -> Screener:
        """Load what policy enables; a required classifier that fails stops start-up."""
        loaded: list[Classifier] = [StructuralScreen()]
        inactive: dict[str, str] = {}
        for name, loader in LOADERS.items():
            spec = config.classifiers.get(name, {})
            if not spec.get("enabled", False):
                inactive[name] = "disabled in the screening policy"
                continue
            try:
                loaded.append(loader(spec, device))
            except ScreenLoadError as exc:
                if not spec.get("optional", False):
                    raise ScreenLoadError(f"screening classifier {name!r} cannot load: {exc} "
                                          "(mark it optional in the screening policy to start "
                                          "without it)") from exc
                inactive[name] = f"optional and not loaded: {exc}"
                logger.warning("screening classifier %s inactive: %s", name, exc)
        return cls(loaded, config, factory, inactive)

    def describe(self) -> dict[str, Any]:
        """What is active, for the start-up audit row (versions embed weight checksums)."""
        return {"active": [{"name": c.name, "version": c.version,
                            "categories": list(c.categories)} for c in self.classifiers],
                "inactive": self.inactive, "policy_sha256": self.config.sha256}

    def output_judge(self) -> dict[str, Any]:
        """Everything that decides the release gate's verdict on a generated reply
        (`judge_outputs`), and nothing else: each active classifier that reads outputs
        (name, version, categories, its table in the policy file) and the policy file's
        output threshold for each of its categories (admin overrides never judge the
        gate's replies). What judges those replies is versioned by this, so a change
        elsewhere in the policy (the tally, request thresholds) or an admin's run-time
        threshold edit does not void the calibrations those replies were judged under."""
        overrides: dict[str, float] = {}
        return {"classifiers": [
            {"name": c.name, "version": c.version, "categories": list(c.categories),
             "reads": f"{getattr(c, 'reads', BOTH)} ({readable.VERSION})",
             "settings": self.config.classifiers.get(c.name, {}),
             "thresholds": {key: self.config.threshold(key, overrides, output=True)
                            for key in (f"{c.name}.{cat}" for cat in c.categories)}}
            for c in self.classifiers if OUTPUT in c.applies_to]}

    def categories(self) -> list[str]:
        """Every "classifier.category" the active classifiers can flag."""
        return [f"{c.name}.{cat}" for c in self.classifiers for cat in c.categories]

    def thresholds(self) -> dict[str, float]:
        with transaction(self.factory) as session:
            rows = session.scalars(select(ScreeningThreshold)).all()
            return {r.category: r.threshold for r in rows}

    def screen(self, texts: Sequence[str], part: str = REQUEST, *,
               reviewed_only: bool = False) -> list[Verdict]:
        """Score every text with every active classifier that judges `part` (cached) and
        flag what reaches its threshold (for OUTPUT: the thresholds for sampled outputs);
        `reviewed_only`: the policy file's thresholds, without admin overrides."""
        if part not in PARTS:
            raise ValueError(f"unknown screening part {part!r}")
        texts = list(texts)
        canon = [readable.canonical(t) for t in texts]
        # Also read with each encoded word decoded (pig latin, scrambled letters): only the
        # telling words of a request, an answer or a sampled output may be encoded.
        alternatives = [canon, [readable.words_decoded(c) for c in canon]]
        overrides = {} if reviewed_only else self.thresholds()
        verdicts = [Verdict() for _ in texts]
        for clf in self.classifiers:
            if part not in clf.applies_to:
                continue
            for verdict, scores in zip(verdicts, self._read(clf, texts, alternatives),
                                       strict=True):
                for category, score in scores.items():
                    key = f"{clf.name}.{category}"
                    verdict.scores[key] = score
                    threshold = self.config.threshold(key, overrides, part == OUTPUT)
                    if score >= threshold:
                        verdict.flagged.append(key)
                        verdict.thresholds[key] = threshold
        return verdicts

    def flag_outputs(self, texts: list[str]) -> list[tuple[list[str], dict[str, Any]]]:
        """Sampled outputs, for the worker's output screen: (flagged, evidence) per text,
        judged by every classifier that reads outputs, structural signals included."""
        verdicts = self.screen(texts, OUTPUT)
        return [(v.flagged, v.evidence()) for v in verdicts]

    def judge_outputs(self, texts: list[str]) -> list[list[str]]:
        """The release gate's harm judge: each generated reply's flagged categories, by
        every classifier that reads outputs at the policy file's output thresholds only
        (versioned by `output_judge`)."""
        return [v.flagged for v in self.screen(texts, OUTPUT, reviewed_only=True)]

    def uncounted(self) -> frozenset[str]:
        """The "classifier.category" keys whose flags do not count toward a run's tally."""
        return frozenset(f"{c.name}.{cat}" for c in self.classifiers
                         if not getattr(c, "tallied", True) for cat in c.categories)

    def _read(self, clf: Classifier, texts: list[str], alternatives: list[list[str]]
              ) -> list[dict[str, float]]:
        """Each text's scores as the classifier reads it (`reads`): in canonical form (the
        first alternative), or as written and in every alternative reading with the
        highest score per category."""
        reads = getattr(clf, "reads", BOTH)
        if reads == CANONICAL:
            return self._scores(clf, alternatives[0])
        scores = self._scores(clf, texts)
        read = [{t} for t in texts]
        for readings in alternatives:
            changed = [i for i, r in enumerate(readings) if r not in read[i]]
            for i in changed:
                read[i].add(readings[i])
            if not changed:
                continue
            for i, alt in zip(changed, self._scores(clf, [readings[i] for i in changed]),
                              strict=True):
                scores[i] = {k: max(v, alt.get(k, v)) for k, v in scores[i].items()}
        return scores

    def _scores(self, clf: Classifier, texts: list[str]) -> list[dict[str, float]]:
        hashes = [content_sha256(t) for t in texts]
        unique = sorted(set(hashes))
        with transaction(self.factory) as session:
            rows = session.scalars(select(ScreeningVerdict).where(
                ScreeningVerdict.classifier_version == clf.version,
                ScreeningVerdict.content_sha256.in_(unique))).all()
            cached = {r.content_sha256: json.loads(r.scores) for r in rows}
        missing = {h: t for h, t in zip(hashes, texts, strict=True) if h not in cached}
        if missing:
            fresh = dict(zip(missing, clf.score(list(missing.values())), strict=True))
            self._store(clf.version, fresh)
            cached.update(fresh)
        return [cached[h] for h in hashes]

    def _store(self, version: str, scores: dict[str, dict[str, float]]) -> None:
        """Add verdicts to the shared cache; another process may have just added the same
        ones, which is fine (same content, same version, same scores)."""
        try:
            with transaction(self.factory) as session:
                existing = set(session.scalars(select(ScreeningVerdict.content_sha256).where(
                    ScreeningVerdict.classifier_version == version,
                    ScreeningVerdict.content_sha256.in_(list(scores)))).all())
                for digest, s in scores.items():
                    if digest not in existing:
                        session.add(ScreeningVerdict(content_sha256=digest,
                                                     classifier_version=version,
                                                     scores=json.dumps(s, sort_keys=True)))
        except IntegrityError:
            # Another process cached some of the same texts first: same content, same
            # version, same scores. The caller has its scores; the next lookup finds theirs.
            logger.debug("screening verdicts were cached concurrently")


def set_threshold(session: Session, *, actor: str, category: str, value: float | None,
                  config: ScreeningConfig, known: Sequence[str]) -> None:
    """Override (or, with None, reset) one category's threshold; audited before/after."""
    if category not in known:
        raise LimitExceeded(f"unknown screening category {category!r}; known: "
                            f"{', '.join(sorted(known))}")
    if value is not None and not 0.0 <= value <= 1.0e6:
        raise LimitExceeded("a threshold must be a number >= 0")
    row = session.get(ScreeningThreshold, category)
    before = config.threshold(category, {category: row.threshold} if row else {})
    if value is None:
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(ScreeningThreshold(category=category, threshold=value))
    else:
        row.threshold = value
    after = value if value is not None else config.threshold(category, {})
    audit_log.append(session, actor=actor, event_type="screening.set_threshold",
                     decision="allow", subject=category,
                     payload={"before": before, "after": after, "override": value is not None})


class BankScreen(HarmfulRequestScreen):
    """The behaviour-bank kNN screen judges requests and sampled outputs, not training
    completions: a bare "Sure, here is the code:" resembles anything in the bank."""

    applies_to = frozenset({REQUEST, OUTPUT})


def _load_harmful(spec: dict[str, Any], device: str) -> Classifier:
    banks = [Path(p) for p in spec.get("banks", [])]
    from policy.screening.harmful_requests import DEFAULT_BANK

    return BankScreen(MiniLM(device=device), load_banks([DEFAULT_BANK, *banks]))


def _load_detoxify(spec: dict[str, Any], device: str) -> Classifier:
    if not spec.get("checkpoint"):
        raise ScreenLoadError("no Detoxify checkpoint is configured "
                              "(classifiers.detoxify.checkpoint)")
    return ToxicityScreen(Path(spec["checkpoint"]), Path(spec.get("config_dir", "")),
                          spec.get("sha256") or None, device)


def _load_rules(spec: dict[str, Any], device: str) -> Classifier:
    return RuleScreen([Path(p) for p in spec.get("files", [])])


# Every pluggable classifier kind: its name in the screening policy's [classifiers] table
# and the loader that builds it from that table's entry (raising ScreenLoadError).
def _load_readability(spec: dict[str, Any], device: str) -> Classifier:
    return ReadabilityScreen(spec.get("languages", ["en"]),
                             float(spec.get("min_confidence", 0.7)))


LOADERS: dict[str, Callable[[dict[str, Any], str], Classifier]] = {
    "readability": _load_readability,
    "harmful_content": load_harm_classifier,
    "harmful_request": _load_harmful,
    "detoxify": _load_detoxify,
    "rules": _load_rules,
    "guard": load_guard,
}
