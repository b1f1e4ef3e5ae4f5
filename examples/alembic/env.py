# env.py: Alembic runs this file for every command. sessionforge migrates through the
# app's factory: online on its engine (with its presets), offline (--sql) from its URL.
from bookshop import Base, db

from sessionforge.alembic import run_migrations

run_migrations(db, target_metadata=Base.metadata)
