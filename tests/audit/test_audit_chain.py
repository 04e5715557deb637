"""The hash-chained audit log on SQLite and PostgreSQL: appends chain, triggers refuse
edits, and verification names the first bad seq when rows are changed behind its back."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from audit import log as audit_log
from audit.db import transaction
from audit.models import AuditEntry


def _append(factory, n: int) -> None:
    for i in range(n):
        with transaction(factory) as session:
            audit_log.append(session, actor="tester", event_type="test.event",
                             decision="allow", subject=f"obj-{i}",
                             payload={"i": i, "note": "ünïcödé ✓"})


def _verify(factory) -> audit_log.VerifyResult:
    with transaction(factory) as session:
        return audit_log.verify(session)


def _without_triggers(factory, sql: str, params: dict | None = None) -> None:
    """What a database administrator could do: bypass the append-only triggers."""
    with transaction(factory) as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
            session.execute(text(sql), params or {})
            session.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))
        else:
            session.execute(text("DROP TRIGGER IF EXISTS audit_log_no_update"))
            session.execute(text("DROP TRIGGER IF EXISTS audit_log_no_delete"))
            session.execute(text(sql), params or {})


def test_a_clean_chain_verifies(factory):
    _append(factory, 25)
    result = _verify(factory)
    assert result.ok and result.rows == 25 and result.head_seq == 25


def test_stored_payload_and_timestamp_text_round_trip_byte_for_byte(factory):
    with transaction(factory) as session:
        entry = audit_log.append(session, actor="a", event_type="e", decision="allow",
                                 payload={"z": 1, "a": "ünïcödé ✓", "n": 0.1})
        written = (entry.payload, entry.created_at, entry.entry_hash)
    with transaction(factory) as session:
        row = session.get(AuditEntry, 1)
        assert (row.payload, row.created_at, row.entry_hash) == written
    assert written[0] == '{"a":"ünïcödé ✓","n":0.1,"z":1}'


def test_entry_hash_encoding_is_frozen():
    """A known-answer vector: changing the encoding breaks every existing trail."""
    digest = audit_log.compute_entry_hash(
        seq=1, created_at="2026-11-21T12:00:00.000000Z", actor="system",
        event_type="gateway.start", subject="", decision="info", request_id="",
        payload='{"x":1}', prev_hash=audit_log.GENESIS_HASH)
    assert digest == "96f6531262f5968aa7d794898b514be8139a19127915bf23a8ab392e71bb20e0"


@pytest.mark.parametrize("statement", [
    "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2",
    "DELETE FROM audit_log WHERE seq = 2",
])
def test_triggers_refuse_update_and_delete(factory, statement):
    _append(factory, 3)
    with pytest.raises(Exception, match="append-only"), transaction(factory) as session:
        session.execute(text(statement))
    assert _verify(factory).ok


def test_truncate_is_refused_on_postgresql(factory):
    with transaction(factory) as session:
        if session.get_bind().dialect.name != "postgresql":
            pytest.skip("TRUNCATE exists only on PostgreSQL")
    _append(factory, 2)
    with pytest.raises(Exception, match="append-only"), transaction(factory) as session:
        session.execute(text("TRUNCATE audit_log"))


def test_a_modified_payload_is_reported_at_its_seq(factory):
    _append(factory, 10)
    _without_triggers(factory, "UPDATE audit_log SET payload = :p WHERE seq = 6",
                      {"p": '{"i":99}'})
    result = _verify(factory)
    assert not result.ok and result.bad_seq == 6 and "modified" in result.reason


def test_a_deleted_middle_row_is_reported_as_missing(factory):
    _append(factory, 10)
    _without_triggers(factory, "DELETE FROM audit_log WHERE seq = 4")
    result = _verify(factory)
    assert not result.ok and result.bad_seq == 4 and "missing" in result.reason


def test_concurrent_appends_from_threads_leave_one_chain(factory):
    import threading

    threads = [threading.Thread(target=_append, args=(factory, 15)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = _verify(factory)
    assert result.ok and result.rows == 60
