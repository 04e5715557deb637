"""Database engines and sessions for SQLite (embedded default) and PostgreSQL.

Owns connection set-up: SQLite gets WAL, foreign keys, a busy timeout and write
transactions that take the write lock at BEGIN (BEGIN IMMEDIATE), so a transaction never
reads a snapshot and then fails to upgrade it to a writer. Must not create tables: the
schema belongs to Alembic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from audit.anchors import HMAC_INFO_KEY, HmacKeys

SQLITE_BUSY_TIMEOUT_MS = 30_000


def sqlite_url(data_dir: Path) -> str:
    """The embedded default: one SQLite file under the data directory."""
    return f"sqlite:///{(Path(data_dir) / 'loragate.db').resolve()}"


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and route them to psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """`read_only` engines serve lookups and long-poll checks: on SQLite they do not take
    the write lock, so readers never queue behind the worker."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _make_sqlite_engine(url, read_only)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _make_sqlite_engine(url: str, read_only: bool) -> Engine:
    if url.startswith("sqlite:///") and ":memory:" not in url:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        if read_only:
            cur.execute("PRAGMA query_only=ON")
        cur.close()

    if read_only:
        return engine  # autocommit reads: each statement sees the latest commit

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        # Take the write lock before the first read: appends read the audit head and
        # then write, and a deferred transaction could not upgrade its WAL snapshot.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine, hmac_keys: HmacKeys | None = None
                      ) -> sessionmaker[Session]:
    """Sessions for `engine`; with `hmac_keys`, audit entries appended through them get
    a MAC (audit.log.append reads the keys from the session's info)."""
    info = {HMAC_INFO_KEY: hmac_keys} if hmac_keys is not None else {}
    return sessionmaker(engine, expire_on_commit=False, autoflush=True, info=info)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commits if the block succeeds, rolls back if it raises.
    Services never commit; whoever opened the transaction does."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
