"""Engines, sessions and migrations.

SQLite (the embedded default) is shared by the API and the driver processes, so every connection
gets WAL, a 30 s busy timeout, foreign keys and synchronous=NORMAL. SQLAlchemy, not the sqlite3
module, emits BEGIN, so that a transaction that writes can start with BEGIN IMMEDIATE (execution
option `sqlite_immediate=True`): it takes the write lock up front, waiting up to the busy timeout,
and its reads and writes are one atomic step (no check-then-write race between processes). DDL is
transactional too. PostgreSQL is reached through psycopg 3 with pre-ping.

Alembic owns the schema: `migrate(url_or_engine)` is `alembic upgrade head` against
service/alembic.ini and service/migrations.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_PRAGMAS = ("foreign_keys=ON", "journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL")
PG_MIGRATION_LOCK = 0x1AD1E                  # pg_advisory_xact_lock key: one migrator at a time
# An execution option (SQLite): send no BEGIN, so that each statement is a transaction of its own (reads:
# a single SELECT needs no BEGIN and ROLLBACK around it; service.store.Store.read_engine)
NO_BEGIN = "ladle_no_begin"


def make_engine(url: str | sa.URL) -> sa.Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        return sa.create_engine(u, pool_pre_ping=True)

    if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(u, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None    # the sqlite3 module emits no BEGIN of its own; _on_begin does
        for pragma in SQLITE_PRAGMAS:
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        options = conn.get_execution_options()
        if not options.get(NO_BEGIN):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("sqlite_immediate") else "BEGIN")

    return engine


def make_sessionmaker(engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> Config:
    """service/alembic.ini, with the migrations folder given absolutely (works from any cwd, and
    without the .ini too)."""
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    return cfg


def migrate(url_or_engine: str | sa.URL | sa.Engine, revision: str = "head", *, down: bool = False) -> None:
    """`alembic upgrade head` (or to `revision`; `down`: downgrade to it), in one transaction (DDL is
    transactional on both backends)."""
    own = not isinstance(url_or_engine, sa.Engine)
    engine = make_engine(url_or_engine) if own else url_or_engine
    sqlite = engine.dialect.name == "sqlite"
    cfg = alembic_config()
    try:
        with engine.connect() as conn:
            if sqlite:   # off outside the transaction: a batch-mode table rebuild must not cascade deletes
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
            try:
                with conn.execution_options(sqlite_immediate=True).begin():
                    if engine.dialect.name == "postgresql":
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_MIGRATION_LOCK)))
                    cfg.attributes["connection"] = conn
                    (command.downgrade if down else command.upgrade)(cfg, revision)
                    if sqlite and (bad := conn.exec_driver_sql("PRAGMA foreign_key_check").all()):
                        raise RuntimeError(f"migration left rows with dangling foreign keys: {bad[:5]}")
            finally:
                if sqlite:
                    conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")
    finally:
        if own:
            engine.dispose()
