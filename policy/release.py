"""The release-gate policy: which evaluation suites an adapter must pass, with what
tolerance, significance level, item minimum and time budget.

Read from a reviewed TOML file (`default_release.toml`, or the operator's own via
`LORAGATE_RELEASE_FILE`); its digest goes into every evaluation report. Must not import
evals, engine or fastapi: it only reads and checks the file; the suites themselves are
loaded and checked against `min_items` by evals.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from policy.errors import PolicyError
from policy.tomlfile import read_toml

DEFAULT_RELEASE_PATH = Path(__file__).with_name("default_release.toml")
GATE_KEYS = {"alpha", "time_budget_seconds", "max_new_tokens", "seed"}
SUITE_KEYS = {"file", "min_items", "tolerance", "gating", "min_base_refusal_rate"}


class ReleasePolicyError(PolicyError):
    """The release policy file is missing or malformed; the message says where."""


@dataclass(frozen=True)
class SuiteRule:
    name: str
    file: str
    min_items: int
    tolerance: float
    gating: bool = True
    min_base_refusal_rate: float = 0.2


@dataclass(frozen=True)
class ReleasePolicy:
    alpha: float
    time_budget_seconds: float
    max_new_tokens: int
    seed: int
    suites: tuple[SuiteRule, ...]
    source: Path
    sha256: str


def load_release_policy(path: Path | None = None) -> ReleasePolicy:
    path = path or DEFAULT_RELEASE_PATH
    raw, data = read_toml(path, "release policy file", ReleasePolicyError)
    gate = data.get("gate", {})
    _no_unknown(path, "[gate]", gate, GATE_KEYS)
    alpha = _number(path, "[gate] alpha", gate.get("alpha", 0.01), 0.0, 1.0)
    budget = _number(path, "[gate] time_budget_seconds", gate.get("time_budget_seconds", 900),
                     1.0, 86_400.0)
    tokens = int(_number(path, "[gate] max_new_tokens", gate.get("max_new_tokens", 24), 1, 512))
    seed = int(_number(path, "[gate] seed", gate.get("seed", 0), 0, 2**63))
    suites = tuple(_suite(path, name, table) for name, table in data.get("suites", {}).items())
    if not any(rule.gating for rule in suites):
        raise ReleasePolicyError(f"{path}: the gate needs at least one gating [suites.<name>]")
    return ReleasePolicy(alpha=alpha, time_budget_seconds=budget, max_new_tokens=tokens,
                         seed=seed, suites=suites, source=path,
                         sha256=hashlib.sha256(raw).hexdigest())


def _suite(path: Path, name: str, table: object) -> SuiteRule:
    where = f"[suites.{name}]"
    if not isinstance(table, dict):
        raise ReleasePolicyError(f"{path}: {where} must be a table")
    _no_unknown(path, where, table, SUITE_KEYS)
    file = table.get("file")
    if not isinstance(file, str) or not file:
        raise ReleasePolicyError(f"{path}: {where} needs file = \"<suite file>\"")
    gating = table.get("gating", True)
    if not isinstance(gating, bool):
        raise ReleasePolicyError(f"{path}: {where} gating must be true or false")
    return SuiteRule(
        name=name, file=file, gating=gating,
        min_items=int(_number(path, f"{where} min_items", table.get("min_items", 1), 1, 1e9)),
        tolerance=_number(path, f"{where} tolerance", table.get("tolerance"), 0.0, 1e6),
        min_base_refusal_rate=_number(path, f"{where} min_base_refusal_rate",
                                      table.get("min_base_refusal_rate", 0.2), 0.0, 1.0))


def _no_unknown(path: Path, where: str, table: dict[str, object], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ReleasePolicyError(f"{path}: {where} has unknown keys {unknown}; "
                                 f"known: {sorted(known)}")


def _number(path: Path, what: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ReleasePolicyError(f"{path}: {what} must be a number in [{low:g}, {high:g}], "
                                 f"got {value!r}")
    return float(value)
