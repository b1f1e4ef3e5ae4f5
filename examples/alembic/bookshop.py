"""The app side of the Alembic example: its factory and its models.

``db`` reads its URL (and every option) from the environment: ``DATABASE_URL``, and
``SESSIONFORGE_*`` variables. ``Book.author_id`` cascades on delete, which is what
makes SQLite's batch migrations dangerous without sessionforge's guard.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionforge import FactoryConfig, SessionFactory


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))


db = SessionFactory(FactoryConfig.from_env())
