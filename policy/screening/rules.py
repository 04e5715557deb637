"""Operator rules: regular expressions and word lists from policy files, each naming the
category it flags. Binary scores (1.0 on a match). Must not import fastapi or engine."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from policy.screening.harmful_requests import ScreenLoadError, read_toml


class RuleScreen:
    name = "rules"
    applies_to = frozenset({"request", "completion", "output"})

    def __init__(self, files: list[Path]) -> None:
        self.rules: list[tuple[str, re.Pattern[str]]] = []
        digest = hashlib.sha256()
        for path in files:
            raw, data = read_toml(path, "screening rule file")
            digest.update(raw)
            for n, rule in enumerate(data.get("rule", []), 1):
                self.rules.append(_compile(rule, f"{path} rule {n}"))
        self.categories = tuple(sorted({c for c, _ in self.rules}))
        self.version = f"rules-{digest.hexdigest()[:12]}"

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        out = []
        for text in texts:
            scores = dict.fromkeys(self.categories, 0.0)
            for category, pattern in self.rules:
                if pattern.search(text):
                    scores[category] = 1.0
            out.append(scores)
        return out


def _compile(rule: dict[str, object], where: str) -> tuple[str, re.Pattern[str]]:
    category = rule.get("category")
    if not isinstance(category, str) or not category.isidentifier():
        raise ScreenLoadError(f"{where}: category must be a name like 'lab_secrets'")
    if isinstance(rule.get("pattern"), str):
        source = str(rule["pattern"])
    elif isinstance(words_list := rule.get("words"), list) and words_list:
        words = [re.escape(str(w)) for w in words_list]
        source = r"\b(?:" + "|".join(words) + r")\b"
    else:
        raise ScreenLoadError(f"{where}: give a regex `pattern` or a list of `words`")
    try:
        return category, re.compile(source, re.IGNORECASE)
    except re.error as exc:
        raise ScreenLoadError(f"{where}: invalid regex: {exc}") from exc
