"""Scenario "asgi": one FastAPI endpoint reading one row by primary key, six ways.

``GET /items/{id}`` returns one row of a 1,000-row table as JSON. The apps differ only
in how the endpoint gets its database access:

* ``sessionforge dependency``: ``Annotated[AsyncSession, Depends(db.dependency())]``;
* ``sessionforge middleware``: ``SessionMiddleware`` + ``db.current()``;
* ``hand-written dependency`` (the baseline): the usual FastAPI recipe, an async
  generator around ``async_sessionmaker(...).begin()``;
* ``advanced-alchemy``: its FastAPI extension, ``Depends(alchemy.provide_session())``
  with ``commit_mode="autocommit"``;
* ``fastapi-async-sqlalchemy``: its ``SQLAlchemyMiddleware`` (``commit_on_exit=True``)
  and ``db.session``;
* ``raw asyncpg`` / ``raw aiosqlite``: the endpoint talks to the driver's pool itself
  (BEGIN, one SELECT, COMMIT).

Requests go straight into each app's ASGI callable (no HTTP server, no socket), so the
numbers are what the framework plus the session machinery cost per request. Each app's
lifespan runs around the whole measurement. Every contender gets a pool of
``--pool-size`` connections.

Run: ``python -m benchmarks.bench_asgi --rounds 5 --seconds 1.5``
"""

from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from sessionforge import SessionFactory
from sessionforge.asgi import SessionMiddleware

from . import harness
from .bench_factory import SELECT_SQL, Item, item_table, pooled_factory, random_id
from .harness import Contender, Params
from .raw import AsyncpgPool, open_pool, raw_name

SCENARIO = "asgi"
BASELINE = "hand-written dependency"
FASTAPI_ASYNC_SQLALCHEMY = "fastapi-async-sqlalchemy"

Message = MutableMapping[str, Any]


def as_json(item: Item | None) -> dict[str, Any]:
    assert item is not None
    return {"id": item.id, "name": item.name, "quantity": item.quantity}


def request_op(app: Any) -> Callable[[], Any]:
    """One ``GET /items/{id}`` through ``app``'s ASGI callable; fails on a non-200."""

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def op() -> None:
        status = 0

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/items/{random_id()}",
            "raw_path": b"",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"bench")],
            "server": ("bench", 80),
            "client": ("127.0.0.1", 1),
        }
        await app(scope, receive, send)
        if status != 200:
            raise RuntimeError(f"GET {scope['path']} answered {status}")

    return op


async def started(app: FastAPI, stack: AsyncExitStack) -> FastAPI:
    await stack.enter_async_context(app.router.lifespan_context(app))
    return app


def sessionforge_dependency_app(db: SessionFactory[AsyncSession]) -> FastAPI:
    app = FastAPI()
    SessionDep = Annotated[AsyncSession, Depends(db.dependency())]

    @app.get("/items/{item_id}")
    async def read(item_id: int, session: SessionDep) -> dict[str, Any]:
        return as_json(await session.get(Item, item_id))

    return app


def sessionforge_middleware_app(db: SessionFactory[AsyncSession]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        return as_json(await db.current().get(Item, item_id))

    return app


def hand_written_app(maker: async_sessionmaker[AsyncSession]) -> FastAPI:
    app = FastAPI()

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with maker.begin() as session:
            yield session

    SessionDep = Annotated[AsyncSession, Depends(get_session)]

    @app.get("/items/{item_id}")
    async def read(item_id: int, session: SessionDep) -> dict[str, Any]:
        return as_json(await session.get(Item, item_id))

    return app


def advanced_alchemy_app(url: str, pool_size: int) -> FastAPI:
    from advanced_alchemy.extensions.fastapi import AdvancedAlchemy, SQLAlchemyAsyncConfig

    app = FastAPI()
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)
    config = SQLAlchemyAsyncConfig(
        engine_instance=engine, commit_mode="autocommit", create_all=False
    )
    alchemy = AdvancedAlchemy(config=config, app=app)
    SessionDep = Annotated[AsyncSession, Depends(alchemy.provide_session())]

    @app.get("/items/{item_id}")
    async def read(item_id: int, session: SessionDep) -> dict[str, Any]:
        return as_json(await session.get(Item, item_id))

    return app


def fastapi_async_sqlalchemy_app(url: str, pool_size: int, stack: AsyncExitStack) -> FastAPI:
    """``SQLAlchemyMiddleware`` + ``db.session``, committing at the end of the request.

    A fresh middleware/proxy pair from ``create_middleware_and_session_proxy()``: the
    module-level ``db`` is process-global and can serve one app only.
    """
    from fastapi_async_sqlalchemy.middleware import create_middleware_and_session_proxy

    middleware, proxy = create_middleware_and_session_proxy()
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)
    stack.push_async_callback(engine.dispose)
    app = FastAPI()
    app.add_middleware(middleware, custom_engine=engine, commit_on_exit=True)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        session: AsyncSession = proxy.session
        return as_json(await session.get(Item, item_id))

    return app


async def raw_app(url: str, pool_size: int, stack: AsyncExitStack) -> FastAPI:
    """The endpoint on the driver's own pool: BEGIN, the SELECT, COMMIT."""
    pool = await open_pool(url, pool_size, stack)
    sql = SELECT_SQL + pool.placeholder
    app = FastAPI()
    if isinstance(pool, AsyncpgPool):

        @app.get("/items/{item_id}")
        async def pg_read(item_id: int) -> dict[str, Any]:
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(sql, item_id)
            return dict(row)

        return app
    sqlite_pool = pool

    @app.get("/items/{item_id}")
    async def lite_read(item_id: int) -> dict[str, Any]:
        async with sqlite_pool.acquire() as conn:
            await conn.execute("BEGIN")
            [row] = await conn.execute_fetchall(sql, (item_id,))
            await conn.commit()
        return {"id": row[0], "name": row[1], "quantity": row[2]}

    return app


@asynccontextmanager
async def contenders(params: Params) -> AsyncIterator[Sequence[Contender]]:
    """Create the table, start every app, yield the contenders; then undo it all."""
    url, size = params.url, params.pool_size
    async with AsyncExitStack() as stack:
        maker = async_sessionmaker(await item_table(params, stack), expire_on_commit=False)
        db = pooled_factory(params, stack)
        apps = {
            "sessionforge dependency": sessionforge_dependency_app(db),
            "sessionforge middleware": sessionforge_middleware_app(db),
            BASELINE: hand_written_app(maker),
        }
        if harness.installed("advanced_alchemy"):
            apps["advanced-alchemy"] = advanced_alchemy_app(url, size)
        if harness.installed("fastapi_async_sqlalchemy"):
            apps[FASTAPI_ASYNC_SQLALCHEMY] = fastapi_async_sqlalchemy_app(url, size, stack)
        raw = raw_name(url)
        if raw is not None:
            apps[raw] = await raw_app(url, size, stack)
        chosen = []
        for name, app in apps.items():
            await started(app, stack)
            chosen.append(Contender(name, request_op(app)))
        for contender in chosen:  # each answers 200 before anything is measured
            await contender.op()
        yield chosen


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help`` and benchmarks/README.md."""
    harness.main(SCENARIO, __doc__ or SCENARIO, contenders, BASELINE, argv)


if __name__ == "__main__":
    main()
