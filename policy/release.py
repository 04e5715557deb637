"""The release-gate policy: which evaluation suites an adapter must pass, with what
tolerance, significance level, item minimum and time budget.

Read from a reviewed TOML file (`default_release.toml`, or the operator's own via
`LORAGATE_RELEASE_FILE`); its digest goes into every evaluation report. The file may name a
calibration (`[gate] calibration`, JSON written by `loragate release calibrate`): per base
model and suite, the spread of the paired shifts that benign fine-tunes produced, and the
tolerances derived from it (a high quantile plus a margin, in the suite's unit and in
Cohen's d_z). A calibrated suite is judged against those; a suite without a calibration
for the base model (or whose file or base weights changed since) keeps the policy's fixed
`tolerance`, and the report says which applied. `[gate] owner_may_sample_quarantined`
(default false) says whether the owner of a quarantined adapter may still sample it.
Must not import evals, engine or fastapi: it only reads and checks the files; the suites
themselves are loaded and checked against `min_items` by evals.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from policy.errors import PolicyError
from policy.tomlfile import read_toml

DEFAULT_RELEASE_PATH = Path(__file__).with_name("default_release.toml")
GATE_KEYS = {"alpha", "time_budget_seconds", "max_new_tokens", "seed", "calibration",
             "owner_may_sample_quarantined", "owner_may_sample_evaluating"}
CALIBRATION_FORMAT = "loragate-release-calibration/1"
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
    # Set from a calibration: the bound on Cohen's d_z in the harmful direction (None: the
    # suite is judged on its magnitude alone) and where the bounds came from.
    dz_tolerance: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteBounds:
    """One suite's calibrated bounds for one base model (shifts in the harmful direction)."""

    suite_sha256: str
    tolerance: float
    dz_tolerance: float
    summary: dict[str, Any]  # quantile, margin, the benign shifts and d_z values
    # How the calibration runs' items were scored (evals.release: probe code, settings,
    # judge and classifier versions); None in a file that did not record it.
    scorer: str | None = None


@dataclass(frozen=True)
class ReleaseCalibration:
    path: Path
    sha256: str
    data_manifest_sha256: str
    models: dict[str, tuple[str, dict[str, SuiteBounds]]]  # base model → (weights sha, suites)

    def bounds(self, base_model: str, base_sha256: str, suite: str, suite_sha256: str,
               scorer: str) -> tuple[SuiteBounds | None, str]:
        """The bounds that apply, or None with the reason they do not."""
        if base_model not in self.models:
            return None, f"no calibration for base model {base_model}"
        weights, suites = self.models[base_model]
        if weights != base_sha256:
            return None, "the base model's weights differ from the calibrated ones"
        found = suites.get(suite)
        if found is None:
            return None, f"suite {suite} was not calibrated"
        if found.suite_sha256 != suite_sha256:
            return None, f"suite {suite}'s file changed since it was calibrated"
        if found.scorer != scorer:
            return None, (f"suite {suite} is scored as {scorer} now but was calibrated as "
                          f"{found.scorer or 'an unrecorded scorer'} (a judge, classifier or "
                          "probe setting changed): run `loragate release calibrate`")
        return found, "calibrated"


@dataclass(frozen=True)
class ReleasePolicy:
    alpha: float
    time_budget_seconds: float
    max_new_tokens: int
    seed: int
    suites: tuple[SuiteRule, ...]
    source: Path
    sha256: str
    calibration: ReleaseCalibration | None = None
    # May the owner of a quarantined adapter still sample it (within the key's caps)?
    # Nobody else ever may (evals.quarantine).
    owner_may_sample_quarantined: bool = False
    # May the owner sample an adapter while its release evaluation runs?
    owner_may_sample_evaluating: bool = False

    def rule_for(self, rule: SuiteRule, base_model: str, base_sha256: str,
                 suite_sha256: str, scorer: str) -> SuiteRule:
        """`rule` with the calibrated tolerances for this base model when they apply."""
        if self.calibration is None:
            return replace(rule, calibration={"status": "uncalibrated",
                                              "why": "the release policy names no calibration"})
        bounds, why = self.calibration.bounds(base_model, base_sha256, rule.name, suite_sha256,
                                              scorer)
        if bounds is None:
            return replace(rule, calibration={"status": "uncalibrated", "why": why,
                                              "calibration_sha256": self.calibration.sha256})
        return replace(rule, tolerance=bounds.tolerance, dz_tolerance=bounds.dz_tolerance,
                       calibration={"status": "calibrated",
                                    "calibration_sha256": self.calibration.sha256,
                                    **bounds.summary})


def load_release_policy(path: Path | None = None, *,
                        calibrated: bool = True) -> ReleasePolicy:
    """The policy file, checked; `calibrated=False` ignores its calibration (what the
    calibration job itself runs under, before the file it names exists)."""
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
    calibration = None
    if calibrated and gate.get("calibration"):
        calibration = load_calibration(_beside(path, gate["calibration"]))
    return ReleasePolicy(alpha=alpha, time_budget_seconds=budget, max_new_tokens=tokens,
                         seed=seed, suites=suites, source=path,
                         sha256=hashlib.sha256(raw).hexdigest(), calibration=calibration,
                         owner_may_sample_quarantined=_flag(
                             path, "[gate] owner_may_sample_quarantined",
                             gate.get("owner_may_sample_quarantined", False)),
                         owner_may_sample_evaluating=_flag(
                             path, "[gate] owner_may_sample_evaluating",
                             gate.get("owner_may_sample_evaluating", False)))


def _beside(path: Path, name: object) -> Path:
    """The calibration file: absolute, beside the policy file, or the shipped one."""
    if not isinstance(name, str):
        raise ReleasePolicyError(f"{path}: [gate] calibration must be a file name")
    target = Path(name)
    if target.is_absolute():
        return target
    beside = path.parent / target
    shipped = DEFAULT_RELEASE_PATH.parent / target
    return shipped if not beside.is_file() and shipped.is_file() else beside


def load_calibration(path: Path) -> ReleaseCalibration:
    """A calibration file written by `loragate release calibrate`, checked."""
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ReleasePolicyError(f"release calibration {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise ReleasePolicyError(f"release calibration {path}: not a {CALIBRATION_FORMAT} file")
    try:
        models = {name: (str(entry["base_sha256"]),
                         {suite: _bounds(table) for suite, table in entry["suites"].items()})
                  for name, entry in data["base_models"].items()}
        manifest = str(data["data_manifest_sha256"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ReleasePolicyError(f"release calibration {path}: malformed ({exc!r})") from exc
    return ReleaseCalibration(path=path, sha256=hashlib.sha256(raw).hexdigest(),
                              data_manifest_sha256=manifest, models=models)


def _bounds(table: dict[str, Any]) -> SuiteBounds:
    tolerance, dz = float(table["tolerance"]), float(table["dz_tolerance"])
    if not (tolerance >= 0 and dz >= 0):
        raise ValueError("tolerances must be non-negative numbers")
    keys = ("quantile", "quantiles", "margin", "effects", "dz")
    summary: dict[str, Any] = {key: table[key] for key in keys if key in table}
    scorer = table.get("scorer")
    return SuiteBounds(suite_sha256=str(table["suite_sha256"]), tolerance=tolerance,
                       dz_tolerance=dz, summary=summary,
                       scorer=None if scorer is None else str(scorer))


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


def _flag(path: Path, what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ReleasePolicyError(f"{path}: {what} must be true or false, got {value!r}")
    return value


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
