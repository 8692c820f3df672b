"""Alembic environment for the store.

The connection comes from service.db.migrate (config.attributes["connection"], already inside the
transaction it commits); from the alembic command line, the URL is `-x url=...`, sqlalchemy.url or
the service settings. Batch mode on SQLite, so that future ALTERs work there too. Timestamps render
as plain sa.DateTime(timezone=True), so migration files import nothing from the service.
"""

from alembic import context

from service.db import make_engine
from service.orm import Base, UTCDateTime

config = context.config


def render_item(type_, obj, autogen_context):
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure(**kw) -> None:
    context.configure(target_metadata=Base.metadata, compare_type=True, render_item=render_item, **kw)


def url() -> str:
    from service.settings import get_settings
    return (context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
            or get_settings().database_url)


def run_migrations(connection) -> None:
    configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    configure(url=url(), literal_binds=True, render_as_batch=url().startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    run_migrations(conn)
else:
    engine = make_engine(url())
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":   # a batch-mode table rebuild must not cascade deletes
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        with conn.begin():
            run_migrations(conn)
    engine.dispose()
