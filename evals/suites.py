"""Evaluation suites as reviewed files with a documented schema, shipped in
`evals/suites/` and extensible by operators (for example a lab's own WMDP-format
multiple-choice file). Each loaded suite carries the SHA-256 of its file, recorded in
every report, so a decision names exactly the items it was made on.

Multiple-choice schema (TOML): `[suite]` name, kind = "multiple_choice", version;
`[[item]]` question, choices (exactly 4, distinct), answer (index of the true choice),
optional fact and paraphrase; optional `[canaries]` strings (distinct).

Must not import fastapi; loads files only.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

SUITES_DIR = Path(__file__).with_name("suites")


class SuiteError(ValueError):
    """A suite file that does not follow its schema; the message says where."""


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    fact: str = ""
    paraphrase: str = ""


@dataclass(frozen=True)
class MultipleChoiceSuite:
    name: str
    version: int
    items: tuple[ChoiceItem, ...]
    canaries: tuple[str, ...]
    sha256: str

    def facts(self) -> list[str]:
        """The statements a training set teaching this domain would contain."""
        return [item.fact for item in self.items if item.fact]


def load_multiple_choice(path: Path) -> MultipleChoiceSuite:
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode())
    except FileNotFoundError as exc:
        raise SuiteError(f"suite file not found: {path}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SuiteError(f"suite {path} is not valid TOML: {exc}") from exc
    head = data.get("suite", {})
    if head.get("kind") != "multiple_choice" or not isinstance(head.get("name"), str):
        raise SuiteError(f"{path}: [suite] needs a name and kind = \"multiple_choice\"")
    items = tuple(_item(path, n, raw_item) for n, raw_item in
                  enumerate(data.get("item", []), 1))
    if not items:
        raise SuiteError(f"{path}: a suite needs at least one [[item]]")
    canaries = tuple(data.get("canaries", {}).get("strings", []))
    if len(set(canaries)) != len(canaries) or not all(isinstance(c, str) and c
                                                      for c in canaries):
        raise SuiteError(f"{path}: canaries must be distinct, non-empty strings")
    return MultipleChoiceSuite(name=head["name"], version=int(head.get("version", 1)),
                               items=items, canaries=canaries,
                               sha256=hashlib.sha256(raw).hexdigest())


def _item(path: Path, n: int, raw: dict[str, object]) -> ChoiceItem:
    where = f"{path}: item {n}"
    question, choices, answer = raw.get("question"), raw.get("choices"), raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise SuiteError(f"{where}: question must be non-empty text")
    if not (isinstance(choices, list) and len(choices) == 4
            and all(isinstance(c, str) and c for c in choices)
            and len(set(choices)) == 4):
        raise SuiteError(f"{where}: choices must be 4 distinct, non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise SuiteError(f"{where}: answer must be the index (0-3) of the true choice")
    return ChoiceItem(question=question, choices=tuple(choices), answer=answer,
                      fact=str(raw.get("fact", "")), paraphrase=str(raw.get("paraphrase", "")))
