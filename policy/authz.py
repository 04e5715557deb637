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
import threading
from pathlib import Path

import casbin
from casbin import persist
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import transaction
from audit.models import PolicyRule
from policy.errors import PolicyError

MODEL_PATH = Path(__file__).with_name("casbin_model.conf")
DEFAULT_POLICY_PATH = Path(__file__).with_name("default_policy.csv")

logger = logging.getLogger("loragate.policy")


class Denied(PolicyError):
    """The policy does not allow this request (HTTP 403)."""


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
    """Thread-safe, fail-closed access to the enforcer."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._enforcer: casbin.Enforcer | None = None

    def load(self) -> None:
        """(Re)build the enforcer from the table. On failure the old one is dropped, so
        every decision is a deny until a load succeeds."""
        with self._lock:
            self._enforcer = None
            self._enforcer = casbin.Enforcer(str(MODEL_PATH), _SqlAdapter(self._factory))

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
