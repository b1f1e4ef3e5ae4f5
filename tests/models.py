"""ORM models with table names of the test's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ForeignKey, Integer, MetaData, String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import ForeignKeyConstraint
from sqlalchemy.sql.compiler import DDLCompiler


@compiles(ForeignKeyConstraint, "mysql", "mariadb")
def _no_deferrable_on_mysql(
    element: ForeignKeyConstraint, compiler: DDLCompiler, **kw: Any
) -> str:
    # MariaDB/MySQL reject DEFERRABLE/INITIALLY in DDL (SQLAlchemy renders them as given):
    # there the foreign key is checked per statement, so no COMMIT can be made to fail
    # with it (the tests that need that skip on MariaDB).
    element.deferrable = element.initially = None
    return compiler.visit_foreign_key_constraint(element, **kw)


@dataclass(frozen=True)
class Models:
    metadata: MetaData
    # Any: each test builds its own classes, which mypy cannot follow as types.
    Item: Any
    Counter: Any
    Parent: Any
    Child: Any
    item: str
    counter: str
    child: str


def make_models(prefix: str) -> Models:
    """Fresh mapped classes on tables named ``{prefix}_item`` and so on."""

    class Base(DeclarativeBase):
        metadata = MetaData()

    class Item(Base):
        __tablename__ = f"{prefix}_item"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        name: Mapped[str] = mapped_column(String(50), unique=True)

    class Counter(Base):
        __tablename__ = f"{prefix}_counter"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        value: Mapped[int] = mapped_column(Integer, default=0)

    class Parent(Base):
        __tablename__ = f"{prefix}_parent"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    class Child(Base):
        # A deferred foreign key is checked at COMMIT, on PostgreSQL and on SQLite
        # (with foreign_keys=ON): the way to make a COMMIT itself fail. InnoDB has no
        # deferred constraints (see above).
        __tablename__ = f"{prefix}_child"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        parent_id: Mapped[int] = mapped_column(
            ForeignKey(f"{prefix}_parent.id", deferrable=True, initially="DEFERRED")
        )

    return Models(
        metadata=Base.metadata,
        Item=Item,
        Counter=Counter,
        Parent=Parent,
        Child=Child,
        item=Item.__tablename__,
        counter=Counter.__tablename__,
        child=Child.__tablename__,
    )
