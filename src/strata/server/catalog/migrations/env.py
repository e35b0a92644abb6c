"""Alembic environment: migrations run in-process at server start (see catalog.db)."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from strata.server.catalog.models import Base

config = context.config
connectable = config.attributes.get("connection")

if connectable is None:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}),
                                prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connectable, target_metadata=Base.metadata,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
