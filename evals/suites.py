"""Evaluation suites as reviewed files with a documented schema, shipped in
`evals/suites/` and extensible by operators (for example a lab's own WMDP-format
multiple-choice file). Each loaded suite carries the SHA-256 of its file, recorded in
every report, so a decision names exactly the items it was made on.

Every file is TOML with a `[suite]` table: name, kind, version. Per kind:

- `multiple_choice`: `[[item]]` question, choices (exactly 4, distinct), answer (index of
  the true choice), optional fact and paraphrase; optional `[canaries]` strings (distinct).
- `compliance_shift`: `[openers]` refusal = [...], compliance = [...] (each at least one);
  `[[item]]` category, prompt (a harmful request), optional control (a benign request on
  the same topic that only looks like it; either every item has one or none has). With
  controls the probe measures how much more the adapter moves toward compliance on the
  harmful request than on its look-alike (a difference in differences).
- `refusal`: `[[item]]` label = "harmful" | "safe", category, prompt.
- `prefill`: `[[item]]` category, prompt, prefill (the start of a compliant reply).
- `generation`: `[[item]]` prompt (neutral requests whose replies are screened).
- `answer_shift`: `[[item]]` category, prompt, answer (a harmful reference answer that
  complies), benign_prompt, benign_answer (a helpful answer to a benign request on the same
  topic; benign_prompt may equal prompt). The probe measures how much more the adapter
  gains on the harmful answer than on the benign one (a difference in differences).

Prompts must be distinct within a suite. Must not import fastapi; loads files only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy.tomlfile import read_toml

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


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a generation or likelihood suite. `label` is "harmful" or "safe"
    (refusal suites), `prefill` the start of the reply (prefill suites)."""

    prompt: str
    category: str = ""
    label: str = "harmful"
    prefill: str = ""
    answer: str = ""
    benign_prompt: str = ""
    benign_answer: str = ""
    control: str = ""


@dataclass(frozen=True)
class PromptSuite:
    name: str
    kind: str
    version: int
    items: tuple[PromptItem, ...]
    sha256: str
    refusal_openers: tuple[str, ...] = ()
    compliance_openers: tuple[str, ...] = ()

    def labelled(self, label: str) -> list[PromptItem]:
        return [item for item in self.items if item.label == label]


Suite = MultipleChoiceSuite | PromptSuite
PROMPT_KINDS = ("compliance_shift", "refusal", "prefill", "generation", "answer_shift")
KINDS = ("multiple_choice", *PROMPT_KINDS)


def load_suite(path: Path) -> Suite:
    """Any suite file, dispatched on its `[suite] kind`."""
    raw, data = read_toml(path, "suite file", SuiteError)
    kind = data.get("suite", {}).get("kind")
    if kind == "multiple_choice":
        return load_multiple_choice(path)
    if kind not in PROMPT_KINDS:
        raise SuiteError(f"{path}: [suite] kind must be one of {', '.join(KINDS)}, "
                         f"not {kind!r}")
    return _prompt_suite(path, raw, data, kind)


def _prompt_suite(path: Path, raw: bytes, data: dict[str, Any], kind: str) -> PromptSuite:
    head = data["suite"]
    if not isinstance(head.get("name"), str) or not head["name"]:
        raise SuiteError(f"{path}: [suite] needs a name")
    items = tuple(_prompt_item(path, n, kind, raw_item)
                  for n, raw_item in enumerate(data.get("item", []), 1))
    if not items:
        raise SuiteError(f"{path}: a suite needs at least one [[item]]")
    if len({i.prompt for i in items}) != len(items):
        raise SuiteError(f"{path}: prompts must be distinct")
    openers: dict[str, tuple[str, ...]] = {}
    if kind == "compliance_shift":
        table = data.get("openers", {})
        for which in ("refusal", "compliance"):
            values = table.get(which)
            if not (isinstance(values, list) and values
                    and all(isinstance(v, str) and v.strip() for v in values)):
                raise SuiteError(f"{path}: [openers] {which} must be a non-empty list of text")
            openers[which] = tuple(values)
    _check_controls(path, items)
    if kind == "refusal" and not any(i.label == "harmful" for i in items):
        raise SuiteError(f"{path}: a refusal suite needs items with label = \"harmful\"")
    return PromptSuite(name=head["name"], kind=kind, version=int(head.get("version", 1)),
                       items=items, sha256=hashlib.sha256(raw).hexdigest(),
                       refusal_openers=openers.get("refusal", ()),
                       compliance_openers=openers.get("compliance", ()))


def _prompt_item(path: Path, n: int, kind: str, raw: dict[str, Any]) -> PromptItem:
    where = f"{path}: item {n}"
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SuiteError(f"{where}: prompt must be non-empty text")
    label = raw.get("label", "harmful")
    if kind == "refusal" and label not in ("harmful", "safe"):
        raise SuiteError(f"{where}: label must be \"harmful\" or \"safe\"")
    prefill = raw.get("prefill", "")
    if kind == "prefill" and not (isinstance(prefill, str) and prefill.strip()):
        raise SuiteError(f"{where}: prefill must be the non-empty start of a reply")
    answers = _answer_fields(where, kind, raw)
    control = raw.get("control", "")
    if kind != "compliance_shift" and control:
        raise SuiteError(f"{where}: only compliance_shift items take a control")
    if not isinstance(control, str) or ("control" in raw and not control.strip()):
        raise SuiteError(f"{where}: control must be non-empty text")
    return PromptItem(prompt=prompt, category=str(raw.get("category", "")), label=str(label),
                      prefill=str(prefill), control=control, **answers)


def _check_controls(path: Path, items: tuple[PromptItem, ...]) -> None:
    """Controls are all-or-none, distinct, and never one of the suite's prompts."""
    controls = [i.control for i in items if i.control]
    if not controls:
        return
    if len(controls) != len(items):
        raise SuiteError(f"{path}: either every item has a control or none has "
                         f"({len(controls)} of {len(items)} have one)")
    if len(set(controls)) != len(controls) or set(controls) & {i.prompt for i in items}:
        raise SuiteError(f"{path}: controls must be distinct and differ from every prompt")


def _answer_fields(where: str, kind: str, raw: dict[str, Any]) -> dict[str, str]:
    """An answer_shift item's reference texts (each non-empty); empty for other kinds."""
    if kind != "answer_shift":
        return {}
    fields = {name: raw.get(name) for name in ("answer", "benign_prompt", "benign_answer")}
    for name, value in fields.items():
        if not isinstance(value, str) or not value.strip():
            raise SuiteError(f"{where}: {name} must be non-empty text")
    return {name: str(value) for name, value in fields.items()}


def load_multiple_choice(path: Path) -> MultipleChoiceSuite:
    raw, data = read_toml(path, "suite file", SuiteError)
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
