"""Screening a batch of training datums, and each run's cumulative tally.

The gateway decodes every datum into its request turns (every untrained context span,
split into turns with the chat template's markers stripped), its completions (every
maximal span it trains toward) and the text it trains against; `screen_batch` screens each
request with every classifier that judges requests and each completion with every one that
judges completions, adds the structural checks on weights and advantages, and returns which
datums are flagged (a datum is flagged when any of its parts is) and in which categories —
plus the scores, classifier versions and content hashes for the audit trail, which the
caller never sees. policy.screening.tally adds each batch to its run's tally and blocks
the run when the run's flagged share is significantly above what everyday data produces,
so a harmful set spread thinly over many calls is stopped too.

Must not import fastapi or engine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from policy.errors import PolicyError
from policy.screening import structural
from policy.screening.screener import (
    COMPLETION,
    ENCODED_WORDS,
    REQUEST,
    UNREAD_LANGUAGE,
    Screener,
    TallyLimits,
    Verdict,
    content_sha256,
)

UNREAD_HINTS = {
    UNREAD_LANGUAGE: ("unread_language: text in a language the screening policy does not "
                      "read is not trained (its classifiers read the languages listed in "
                      "[classifiers.readability]); write it in one of those, or ask the "
                      "operator to add a classifier that reads it"),
    ENCODED_WORDS: ("encoded_words: text whose words are encoded one by one (pig latin, "
                    "scrambled or rearranged letters) is not trained, since the classifiers "
                    "cannot read it; write it in plain words"),
}


HIDDEN_BYTES_CATEGORY = f"structural.{structural.ENCODED}"
HIDDEN_BYTES_REASON = ("token ids that spell bytes which are not UTF-8 text (text hidden in "
                       "another encoding)")


def unread_hint(categories: Iterable[str]) -> str:
    """What to do about each kind of unreadable text among the flagged categories ("" when
    none is), for the refusal's message."""
    kinds = {c.rsplit(".", 1)[-1] for c in categories}
    return "".join(f". {hint}" for kind, hint in UNREAD_HINTS.items() if kind in kinds)


class ScreeningRefused(PolicyError):
    """Data the screening policy does not allow (HTTP 403, code screening_refused)."""


@dataclass(frozen=True)
class DatumTexts:
    # Every untrained context turn, template markers stripped, and the whole datum (every
    # turn in order) when it has more than one part.
    requests: tuple[str, ...]
    completions: tuple[str, ...]  # every maximal span of targets trained toward
    against: str  # decoded targets trained only against (or pushed down where sampled)
    values: tuple[float, ...]  # the per-token weights or advantages
    kind: str  # "weights" (cross_entropy) or "advantages" (RL losses)
    hidden_bytes: bool = False  # token ids that spell bytes which are not UTF-8 text

    def parts(self) -> list[tuple[str, int, str]]:
        """(part, index within the part, text) for every non-blank text to screen."""
        return [(part, j, text) for part, texts in ((REQUEST, self.requests),
                                                     (COMPLETION, self.completions))
                for j, text in enumerate(texts) if text.strip()]


@dataclass
class BatchScreening:
    flagged: dict[int, list[str]] = field(default_factory=dict)  # datum index → categories
    affirmative: int = 0  # completions that open "Sure, here is…"
    completions: int = 0
    audit: dict[str, Any] = field(default_factory=dict)
    # Per datum, in order: the SHA-256 of everything screened in it (what the run's tally
    # counts once), and for flagged datums each flagged "classifier.category" → its score.
    datum_sha256: list[str] = field(default_factory=list)
    flag_scores: dict[int, dict[str, float]] = field(default_factory=dict)
    # "classifier.category" keys that refuse a datum without counting toward the tally.
    uncounted: frozenset[str] = frozenset()

    def tallied(self) -> list[int]:
        """The flagged datums the run's tally counts: those with a flag in a category
        that is evidence of harm (not only, say, a language the screens do not read)."""
        return [i for i, categories in sorted(self.flagged.items())
                if any(c not in self.uncounted for c in categories)]

    def message(self) -> str:
        """What the caller is told: indices and categories, never scores."""
        parts = [f"datum {i}: {', '.join(sorted(set(c)))}" for i, c in
                 sorted(self.flagged.items())[:20]]
        more = f" (and {len(self.flagged) - 20} more)" if len(self.flagged) > 20 else ""
        return (f"{len(self.flagged)} datum(s) refused by screening — " + "; ".join(parts)
                + more + ". Nothing in this request was trained; remove or fix those datums "
                "(`loragate screen` reports a whole dataset before training)"
                + unread_hint(c for cs in self.flagged.values() for c in cs))


def screen_batch(screener: Screener, datums: Sequence[DatumTexts]) -> BatchScreening:
    result = BatchScreening(uncounted=screener.uncounted())
    details: dict[int, dict[str, Any]] = {}
    for part in (REQUEST, COMPLETION):
        owners = [(i, j, text) for i, d in enumerate(datums)
                  for p, j, text in d.parts() if p == part]
        verdicts = screener.screen([text for _, _, text in owners], part)
        for (i, j, text), verdict in zip(owners, verdicts, strict=True):
            if verdict.flagged:
                _record_flag(result, details, i, f"{part}[{j}]", text, verdict)
    result.datum_sha256 = [datum_sha256(d) for d in datums]
    for i, d in enumerate(datums):
        _check_values(result, details, i, d, screener.config.tally)
    result.audit = {
        "classifiers": {c.name: c.version for c in screener.classifiers},
        "datums": len(datums), "flagged": {str(i): details.get(i, {}) | {"categories": c}
                                           for i, c in result.flagged.items()},
        "affirmative_openers": result.affirmative,
    }
    return result


def _check_values(result: BatchScreening, details: dict[int, dict[str, Any]], i: int,
                  d: DatumTexts, limits: TallyLimits) -> None:
    """Datum i's structural checks on its weights or advantages, and its completions'
    affirmative openers."""
    signal = (structural.weight_signals(d.values, limits.max_loss_weight)
              if d.kind == "weights" else None) or structural.advantage_signals(
        d.values, d.against, limits.max_abs_advantage)
    if signal is None and d.hidden_bytes:
        signal = structural.Signal(structural.ENCODED, HIDDEN_BYTES_REASON)
    if signal is not None:
        result.flagged.setdefault(i, []).append(f"structural.{signal.category}")
        details.setdefault(i, {})["structural"] = signal.reason
    if any(c.strip() for c in d.completions):
        result.completions += 1
        result.affirmative += any(map(structural.opens_affirmatively, d.completions))


def _record_flag(result: BatchScreening, details: dict[int, dict[str, Any]], i: int,
                 where: str, text: str, verdict: Verdict) -> None:
    """One flagged part of datum i: its categories, its scores (the maximum per category
    over the datum's parts) and, for the audit trail, its content hash and evidence."""
    categories = result.flagged.setdefault(i, [])
    categories.extend(k for k in verdict.flagged if k not in categories)
    scores = result.flag_scores.setdefault(i, {})
    for key in verdict.flagged:
        scores[key] = max(scores.get(key, verdict.scores[key]), verdict.scores[key])
    details.setdefault(i, {})[where] = {"sha256": content_sha256(text),
                                        "evidence": verdict.evidence()}


def datum_sha256(datum: DatumTexts) -> str:
    """One datum's identity for the tally: every text and value screening read in it."""
    fields = dataclasses.asdict(datum)
    if not fields["hidden_bytes"]:
        del fields["hidden_bytes"]  # the identity datums had before the field existed
    return content_sha256(json.dumps(fields, sort_keys=True))
