"""Alembic environment: the engine comes from service.db (config.attributes["engine"]) or from
LADLE_DATABASE_URL; batch mode on SQLite so that ALTERs work there too."""

from alembic import context

from service.db import make_engine
from service.orm import Base

config = context.config


def run() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from service.settings import get_settings
        engine = make_engine(config.get_main_option("sqlalchemy.url") or get_settings().database_url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
