"""Authorization decisions: a casbin enforcer over the `policy_rules` table.

The model (`casbin_model.conf`) and the default policy (`default_policy.csv`) are reviewed
files; the rules in force live in SQL so admins can change them without a restart.
Decisions fail closed: no enforcer, a broken policy or an error while enforcing all mean
deny. No key or role bypasses this check.

Must not import fastapi or engine.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from pathlib import Path

import casbin
from casbin import persist
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import transaction
from audit.models import PolicyRule
from policy.errors import LimitExceeded, PolicyError

MODEL_PATH = Path(__file__).with_name("casbin_model.conf")
DEFAULT_POLICY_PATH = Path(__file__).with_name("default_policy.csv")

logger = logging.getLogger("loragate.policy")


class Denied(PolicyError):
    """The policy does not allow this request (HTTP 403)."""


class InvalidRule(LimitExceeded):
    """A policy rule that is malformed (HTTP 400)."""


class PolicyNotFound(PolicyError):
    """No such policy rule (HTTP 404)."""


def read_policy_file(path: Path = DEFAULT_POLICY_PATH) -> list[list[str]]:
    """Policy lines of a reviewed CSV file: `ptype, v0, v1, ...`, '#' starts a comment."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append([field.strip() for field in line.split(",")])
    return lines


def seed_default_policy(session: Session, actor: str = "system") -> int:
    """Load the default policy into an empty policy table (audited); returns rows added."""
    if session.scalar(select(func.count()).select_from(PolicyRule)):
        return 0
    rows = read_policy_file()
    for ptype, *values in rows:
        session.add(PolicyRule(ptype=ptype, **{f"v{i}": v for i, v in enumerate(values)}))
    session.flush()
    digest = hashlib.sha256(DEFAULT_POLICY_PATH.read_bytes()).hexdigest()
    audit_log.append(session, actor=actor, event_type="policy.seed", decision="info",
                     subject="policy_rules",
                     payload={"rules": len(rows), "source": DEFAULT_POLICY_PATH.name,
                              "sha256": digest})
    return len(rows)


# Checked with fullmatch: `$` alone would let a trailing newline through.
RULE_SUBJECT = re.compile(r"\*|role:[a-z_]+|principal:[A-Za-z0-9-]+")
RULE_WORD = re.compile(r"\*|[a-z_]+")


def list_rules(session: Session) -> list[PolicyRule]:
    return list(session.scalars(select(PolicyRule).order_by(PolicyRule.id)).all())


def _policy_digest(rules: list[PolicyRule]) -> str:
    text = "\n".join(", ".join([r.ptype, *r.values()]) for r in rules)
    return hashlib.sha256(text.encode()).hexdigest()


def _rule_text(rule: PolicyRule) -> str:
    return ", ".join([rule.ptype, *rule.values()])


def add_rule(session: Session, *, actor: str, subject: str, resource: str, action: str,
             effect: str) -> PolicyRule:
    """Add `p, subject, resource, action, effect`; audited with the policy before/after."""
    _check_rule(subject, resource, action, effect)
    before = list_rules(session)
    rule = PolicyRule(ptype="p", v0=subject, v1=resource, v2=action, v3=effect)
    session.add(rule)
    session.flush()
    _audit_change(session, actor, "policy.add_rule", rule, before)
    return rule


def remove_rule(session: Session, *, actor: str, rule_id: int) -> PolicyRule:
    before = list_rules(session)
    rule = session.get(PolicyRule, rule_id)
    if rule is None:
        raise PolicyNotFound(f"policy rule {rule_id} not found")
    session.delete(rule)
    session.flush()
    _audit_change(session, actor, "policy.remove_rule", rule, before)
    return rule


def _check_rule(subject: str, resource: str, action: str, effect: str) -> None:
    if not RULE_SUBJECT.fullmatch(subject):
        raise InvalidRule("subject must be '*', 'role:<name>' or 'principal:<id>'")
    if not (RULE_WORD.fullmatch(resource) and RULE_WORD.fullmatch(action)):
        raise InvalidRule("resource and action must be '*' or lower-case words")
    if effect not in ("allow", "deny"):
        raise InvalidRule("effect must be 'allow' or 'deny'")


def _audit_change(session: Session, actor: str, event: str, rule: PolicyRule,
                  before: list[PolicyRule]) -> None:
    after = list_rules(session)
    audit_log.append(session, actor=actor, event_type=event, decision="allow",
                     subject=f"policy_rules/{rule.id}",
                     payload={"rule": _rule_text(rule),
                              "before": {"rules": len(before), "sha256": _policy_digest(before)},
                              "after": {"rules": len(after), "sha256": _policy_digest(after)}})


def policy_fingerprint(session: Session) -> str:
    """The digest of the rules in force (ids and content). Changes with every edit — also
    when a removed rule's id is reused by SQLite for the next one."""
    rules = session.execute(select(PolicyRule.id, PolicyRule.ptype, PolicyRule.v0,
                                   PolicyRule.v1, PolicyRule.v2, PolicyRule.v3, PolicyRule.v4,
                                   PolicyRule.v5).order_by(PolicyRule.id)).all()
    text = "\n".join("\t".join(map(str, r)) for r in rules)
    return hashlib.sha256(text.encode()).hexdigest()


class _SqlAdapter(persist.Adapter):  # type: ignore[misc]
    """Reads the policy rows; edits go through this module's functions, not casbin's."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory

    def load_policy(self, model: casbin.Model) -> None:
        with transaction(self._factory) as session:
            rules = session.scalars(select(PolicyRule).order_by(PolicyRule.id)).all()
            lines = [", ".join([rule.ptype, *rule.values()]) for rule in rules]
        for line in lines:
            persist.load_policy_line(line, model)


class Authorizer:
    """Thread-safe, fail-closed access to the enforcer. Give it a read-only session
    factory: it never writes, and on SQLite a reload must not queue for the write lock."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._enforcer: casbin.Enforcer | None = None
        self._fingerprint: str | None = None

    def load(self) -> None:
        """(Re)build the enforcer from the table. On failure the old one is dropped, so
        every decision is a deny until a load succeeds."""
        with self._lock:
            self._enforcer = None
            with transaction(self._factory) as session:
                fingerprint = policy_fingerprint(session)
            self._enforcer = casbin.Enforcer(str(MODEL_PATH), _SqlAdapter(self._factory))
            self._fingerprint = fingerprint

    def ensure_current(self, session: Session) -> None:
        """Reload if the rules changed since the last load (in this or another process),
        so a policy edit applies to the very next request without a restart."""
        if policy_fingerprint(session) != self._fingerprint:
            self.load()

    @property
    def version(self) -> str:
        """The policy in force, as recorded in audit rows (a prefix of its digest)."""
        return self._fingerprint[:16] if self._fingerprint else "none"

    def disable(self) -> None:
        with self._lock:
            self._enforcer = None

    def allows(self, principal_id: str, role: str, resource: str, action: str) -> bool:
        with self._lock:
            enforcer = self._enforcer
        if enforcer is None:
            return False
        try:
            return bool(enforcer.enforce(f"principal:{principal_id}", f"role:{role}",
                                         resource, action))
        except Exception:
            logger.exception("policy enforcement failed; denying")
            return False

    def authorize(self, principal_id: str, role: str, resource: str, action: str) -> None:
        if not self.allows(principal_id, role, resource, action):
            raise Denied(f"policy does not allow role {role!r} to {action} {resource}")
