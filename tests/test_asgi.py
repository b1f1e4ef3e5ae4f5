"""The ASGI integration through httpx.ASGITransport, on every backend.

The rule under test everywhere: a request's transaction ends before its response
starts, so a failed COMMIT is a 5xx and the database holds nothing of that request.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

from sessionforge import (
    ConfigurationError,
    NestedTransactionError,
    NoCurrentSessionError,
    SessionClosedError,
    SessionFactory,
)
from sessionforge.asgi import SessionMiddleware

from .conftest import NO_FAILING_COMMIT, count_rows
from .models import Models

PATHS = [pytest.param("dependency", id="dependency"), pytest.param("middleware", id="middleware")]


class Seen:
    """What the app's own exception handler received."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []


def build_app(db: SessionFactory[Any], models: Models, path: str, commit: Any = "auto") -> FastAPI:
    """One app whose endpoints get their session through ``path``."""
    app = FastAPI()
    seen = Seen()
    app.state.seen = seen
    if path == "middleware":
        app.add_middleware(SessionMiddleware, factory=db, commit=commit)
        dependency_commit = "auto"
    else:
        dependency_commit = commit
    SessionDep = Annotated[AsyncSession, Depends(db.dependency(commit=dependency_commit))]

    @app.exception_handler(RuntimeError)
    async def on_runtime_error(request: Request, exc: RuntimeError) -> JSONResponse:
        seen.errors.append(exc)
        return JSONResponse({"error": str(exc)}, status_code=500)

    @app.post("/items/{name}", status_code=201)
    async def create(name: str, session: SessionDep) -> dict[str, str]:
        session.add(models.Item(name=name))
        await session.flush()
        return {"name": name}

    @app.post("/redirect/{name}")
    async def create_and_redirect(name: str, session: SessionDep) -> RedirectResponse:
        session.add(models.Item(name=name))
        return RedirectResponse(f"/items/{name}", status_code=303)

    @app.post("/conflict/{name}")
    async def conflict(name: str, session: SessionDep) -> None:
        session.add(models.Item(name=name))
        await session.flush()
        raise HTTPException(409, "taken")

    @app.post("/crash/{name}")
    async def crash(name: str, session: SessionDep) -> None:
        session.add(models.Item(name=name))
        await session.flush()
        raise RuntimeError(f"handler failed after adding {name}")

    @app.post("/orphan")
    async def orphan(session: SessionDep) -> dict[str, bool]:
        # The deferred foreign key is checked by COMMIT only: the handler succeeds.
        session.add(models.Child(id=1, parent_id=999))
        await session.flush()
        return {"ok": True}

    @app.post("/manual/{name}")
    async def manual(name: str, session: SessionDep, commit: bool = False) -> dict[str, str]:
        session.add(models.Item(name=name))
        if commit:
            await session.commit()
        return {"name": name}

    @app.get("/shared")
    async def shared(first: SessionDep, second: SessionDep) -> dict[str, bool]:
        return {"same": first is second and db.current() is first}

    @app.post("/savepoint")
    async def savepoint(session: SessionDep) -> dict[str, bool]:
        session.add(models.Item(name="kept"))
        with pytest.raises(ValueError, match="undo"):
            async with db.atomic() as inner:
                assert inner is session
                inner.add(models.Item(name="undone"))
                await inner.flush()
                raise ValueError("undo")
        return {"ok": True}

    @app.post("/background")
    async def background(session: SessionDep, tasks: BackgroundTasks) -> dict[str, bool]:
        session.add(models.Item(name="request"))

        async def later() -> None:
            try:
                await session.execute(text("SELECT 1"))
            except SessionClosedError as error:
                seen.errors.append(error)
            async with db.begin() as own:
                own.add(models.Item(name="background"))

        tasks.add_task(later)
        return {"ok": True}

    @app.post("/stream")
    async def stream(session: SessionDep) -> StreamingResponse:
        session.add(models.Item(name="streamed"))
        await session.flush()

        async def body() -> AsyncIterator[bytes]:
            async with db() as own:  # committed before the first chunk
                count = await own.scalar(select(func.count()).select_from(models.Item))
            yield f"{count}\n".encode()
            try:
                await session.execute(text("SELECT 1"))
            except SessionClosedError as error:
                yield type(error).__name__.encode()

        return StreamingResponse(body())

    @app.get("/nothing")
    async def nothing() -> dict[str, int]:
        return {"checked_out": db.status().checked_out, "open": db.status().sessions_open}

    return app


@pytest.fixture
async def client_for(db: SessionFactory[Any]) -> AsyncIterator[Any]:
    clients: list[httpx.AsyncClient] = []

    def make(app: Any) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        client = httpx.AsyncClient(transport=transport, base_url="http://test")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()
    assert db.status().checked_out == 0


async def talk_to_websocket(app: Any, text: str) -> list[str]:
    """Drive ``/ws`` as raw ASGI: a connect, one text frame; return the texts sent back."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    incoming.put_nowait({"type": "websocket.connect"})
    incoming.put_nowait({"type": "websocket.receive", "text": text})
    sent: list[str] = []

    async def send(message: Any) -> None:
        if message["type"] == "websocket.send":
            sent.append(message["text"])

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    await app(scope, incoming.get, send)
    return sent


def names(outside: Engine, models: Models) -> set[str]:
    with outside.connect() as connection:
        return set(connection.execute(text(f"SELECT name FROM {models.item}")).scalars())


@pytest.mark.parametrize("path", PATHS)
async def test_success_commits_before_the_response(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    app = build_app(db, models, path)
    at_start: list[set[str]] = []

    async def watching(scope: Any, receive: Any, send: Any) -> None:
        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":  # what the database holds now
                at_start.append(names(outside, models))
            await send(message)

        await app(scope, receive, watch)

    response = await client_for(watching).post("/items/ada")
    assert response.status_code == 201
    assert at_start == [{"ada"}]
    assert db.status().checked_out == 0


@pytest.mark.parametrize("path", PATHS)
async def test_http_exception_rolls_back(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    client = client_for(build_app(db, models, path))
    response = await client.post("/conflict/ada")
    assert (response.status_code, response.json()) == (409, {"detail": "taken"})
    assert names(outside, models) == set()


@pytest.mark.parametrize("path", PATHS)
async def test_handler_error_rolls_back_and_reaches_the_apps_handler(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    app = build_app(db, models, path)
    response = await client_for(app).post("/crash/ada")
    assert response.status_code == 500
    assert response.json() == {"error": "handler failed after adding ada"}
    [error] = app.state.seen.errors
    assert type(error) is RuntimeError  # the original, not a cleanup error
    assert names(outside, models) == set()


@pytest.mark.skip_backend("mysql", reason=NO_FAILING_COMMIT)
@pytest.mark.parametrize("path", PATHS)
async def test_failed_commit_is_a_5xx_and_leaves_nothing(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    response = await client_for(build_app(db, models, path)).post("/orphan")
    assert response.status_code == 500
    assert "ok" not in response.text
    assert count_rows(outside, models.child) == 0
    assert db.status().checked_out == 0


@pytest.mark.skip_backend("mysql", reason=NO_FAILING_COMMIT)
async def test_failed_commit_reaches_a_dependency_apps_handler_before_the_response(
    db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    # With the dependency, the COMMIT fails before FastAPI sends anything, so the app's
    # own handler for the database error answers (here 409).
    from sqlalchemy.exc import IntegrityError

    app = build_app(db, models, "dependency")

    @app.exception_handler(IntegrityError)
    async def on_integrity_error(request: Request, exc: IntegrityError) -> JSONResponse:
        return JSONResponse({"error": "conflict"}, status_code=409)

    response = await client_for(app).post("/orphan")
    assert (response.status_code, response.json()) == (409, {"error": "conflict"})
    assert count_rows(outside, models.child) == 0


@pytest.mark.parametrize(
    ("commit", "status", "kept"),
    [
        pytest.param("auto", 303, True, id="auto-redirect-commits"),
        pytest.param("strict", 303, False, id="strict-redirect-rolls-back"),
    ],
)
async def test_middleware_commit_modes_by_status(
    commit: str,
    status: int,
    kept: bool,
    db: SessionFactory[Any],
    models: Models,
    outside: Engine,
    client_for: Any,
) -> None:
    client = client_for(build_app(db, models, "middleware", commit=commit))
    response = await client.post("/redirect/ada", follow_redirects=False)
    assert response.status_code == status
    assert names(outside, models) == ({"ada"} if kept else set())


@pytest.mark.parametrize("path", PATHS)
async def test_manual_mode_commits_only_what_the_handler_commits(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    client = client_for(build_app(db, models, path, commit="manual"))
    assert (await client.post("/manual/dropped")).status_code == 200
    assert (await client.post("/manual/kept", params={"commit": True})).status_code == 200
    assert names(outside, models) == {"kept"}


@pytest.mark.parametrize("path", PATHS)
async def test_one_session_per_request_and_it_is_current(
    path: str, db: SessionFactory[Any], models: Models, client_for: Any
) -> None:
    response = await client_for(build_app(db, models, path)).get("/shared")
    assert response.json() == {"same": True}


@pytest.mark.parametrize("path", PATHS)
async def test_atomic_in_a_request_is_a_savepoint_of_it(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    response = await client_for(build_app(db, models, path)).post("/savepoint")
    assert response.status_code == 200
    assert names(outside, models) == {"kept"}


@pytest.mark.parametrize("path", PATHS)
async def test_background_tasks_get_their_own_session(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    app = build_app(db, models, path)
    assert (await client_for(app).post("/background")).status_code == 200
    [error] = app.state.seen.errors
    assert isinstance(error, SessionClosedError)
    assert "session.execute() refused" in str(error)
    assert "async with db.begin() as session:" in str(error)
    assert names(outside, models) == {"request", "background"}


@pytest.mark.parametrize("path", PATHS)
async def test_streaming_body_starts_after_the_commit(
    path: str, db: SessionFactory[Any], models: Models, client_for: Any
) -> None:
    response = await client_for(build_app(db, models, path)).post("/stream")
    assert response.status_code == 200
    assert response.text == "1\nSessionClosedError"


async def test_middleware_makes_no_session_for_a_request_that_needs_none(
    db: SessionFactory[Any], models: Models, client_for: Any
) -> None:
    before = db.status().sessions_open
    response = await client_for(build_app(db, models, "middleware")).get("/nothing")
    assert response.json() == {"checked_out": 0, "open": before}


async def test_middleware_current_session_reaches_child_tasks(
    db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db)

    async def add(name: str) -> AsyncSession:
        session: AsyncSession = db.current()
        session.add(models.Item(name=name))
        return session

    @app.post("/two")
    async def two() -> dict[str, bool]:
        first = await asyncio.create_task(add("one"))
        second = await add("two")
        return {"same": first is second}

    response = await client_for(app).post("/two")
    assert response.json() == {"same": True}
    assert names(outside, models) == {"one", "two"}


async def test_dependency_inside_the_middleware_shares_and_defers(
    db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    # A "manual" dependency inside an "auto" middleware: the middleware decides.
    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db, commit="auto")
    ManualDep = Annotated[AsyncSession, Depends(db.dependency(commit="manual"))]

    @app.post("/items/{name}")
    async def create(name: str, session: ManualDep) -> dict[str, bool]:
        session.add(models.Item(name=name))
        return {"current": db.current() is session}

    response = await client_for(app).post("/items/ada")
    assert response.json() == {"current": True}
    assert names(outside, models) == {"ada"}


async def test_dependency_options_apply_to_the_transaction(
    db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    app = FastAPI()
    ReadDep = Annotated[AsyncSession, Depends(db.dependency(readonly=True))]

    @app.post("/items/{name}")
    async def create(name: str, session: ReadDep) -> dict[str, str]:
        session.add(models.Item(name=name))
        await session.flush()
        return {"name": name}

    @app.get("/count")
    async def count(session: ReadDep) -> int:
        return int(await session.scalar(select(func.count()).select_from(models.Item)) or 0)

    client = client_for(app)
    assert (await client.get("/count")).json() == 0
    response = await client.post("/items/ada")
    assert response.status_code == 500
    assert names(outside, models) == set()


def test_dependency_is_memoised_per_options(db: SessionFactory[Any]) -> None:
    assert db.dependency() is db.dependency()
    assert db.dependency() is db.dependency(commit="auto", readonly=False)
    assert db.dependency(readonly=True) is not db.dependency()
    assert db.dependency(commit="manual") is not db.dependency()


def test_bad_commit_modes_are_configuration_errors(db: SessionFactory[Any]) -> None:
    with pytest.raises(ConfigurationError, match=r"commit='always' is not one of 'auto'"):
        db.dependency(commit="always")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"'auto', 'strict', 'manual'"):
        SessionMiddleware(FastAPI(), factory=db, commit="2xx")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="isolation_level='SOMETIMES' is not supported"):
        db.dependency(isolation_level="SOMETIMES")


@pytest.mark.parametrize("path", PATHS)
async def test_cancelled_request_leaks_nothing(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    app = build_app(db, models, path)
    in_handler = asyncio.Event()

    @app.post("/slow")
    async def slow(session: Annotated[AsyncSession, Depends(db.dependency())]) -> None:
        session.add(models.Item(name="slow"))
        await session.flush()
        in_handler.set()
        await asyncio.sleep(30)

    request = asyncio.create_task(client_for(app).post("/slow"))
    await in_handler.wait()
    assert db.status().checked_out == 1
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert db.status().checked_out == 0
    assert names(outside, models) == set()
    async with db.begin() as session:  # the pool serves the next request
        assert await session.scalar(text("SELECT 42")) == 42


async def test_websockets_pass_through_the_middleware(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    from starlette.websockets import WebSocket

    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            db.current()
        except NoCurrentSessionError:
            await websocket.send_text("no request session")
        name = await websocket.receive_text()
        async with db.begin() as session:
            session.add(models.Item(name=name))
        await websocket.send_text("saved")
        await websocket.close()

    assert await talk_to_websocket(app, "ada") == ["no request session", "saved"]
    assert names(outside, models) == {"ada"}


async def test_dependency_rejects_other_options_in_one_request(
    db: SessionFactory[Any], models: Models, client_for: Any
) -> None:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db)
    failures: list[BaseException] = []

    @app.exception_handler(NestedTransactionError)
    async def refused(request: Request, exc: NestedTransactionError) -> JSONResponse:
        failures.append(exc)
        return JSONResponse({}, status_code=500)

    @app.get("/mixed")
    async def mixed(
        first: Annotated[AsyncSession, Depends(db.dependency())],
        second: Annotated[AsyncSession, Depends(db.dependency(readonly=True))],
    ) -> None:
        pytest.fail("two sessions options in one request")

    assert (await client_for(app).get("/mixed")).status_code == 500
    [error] = failures
    assert "same db.dependency(...)" in str(error)
    assert db.status().checked_out == 0


# the lifespan -----------------------------------------------------------------------


async def test_lifespan_disposes_every_engine(db: SessionFactory[Any]) -> None:
    app = FastAPI(lifespan=db.lifespan)
    async with app.router.lifespan_context(app):
        async with db.begin() as session:
            await session.execute(text("SELECT 1"))
        assert db.status().engines
    assert db.status().engines == ()


async def test_lifespan_with_ping_fails_fast_without_a_database() -> None:
    from sessionforge import DatabaseUnavailableError

    db = SessionFactory("postgresql+asyncpg://app:s3cret@127.0.0.1:1/app")
    app = FastAPI(lifespan=db.lifespan.with_ping(timeout=5))
    with pytest.raises(
        DatabaseUnavailableError, match="startup check failed: cannot reach"
    ) as info:
        async with app.router.lifespan_context(app):
            pytest.fail("the app started")
    assert "s3cret" not in str(info.value)
    await db.dispose()


async def test_lifespan_composes_with_the_apps_own(db: SessionFactory[Any]) -> None:
    from contextlib import asynccontextmanager

    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with db.lifespan.with_ping()(app):
            events.append("startup")
            yield
            async with db() as session:  # the database is still there
                events.append(f"shutdown {await session.scalar(text('SELECT 1'))}")

    app = FastAPI(lifespan=lifespan)
    async with app.router.lifespan_context(app):
        pass
    assert events == ["startup", "shutdown 1"]
    assert db.status().engines == ()


def test_lifespan_repr_masks_the_password() -> None:
    db = SessionFactory("postgresql+asyncpg://app:s3cret@127.0.0.1/app")
    shown = repr(db.lifespan.with_ping(3))
    assert "s3cret" not in shown
    assert "ping_timeout=3" in shown


async def test_middleware_rolls_back_a_failed_endpoint_whatever_its_handler_answers(
    db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    class NeedsLogin(Exception):
        pass

    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db)

    @app.exception_handler(NeedsLogin)
    async def to_login(request: Request, exc: NeedsLogin) -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    @app.post("/items/{name}")
    async def create(
        name: str, session: Annotated[AsyncSession, Depends(db.dependency())]
    ) -> None:
        session.add(models.Item(name=name))
        await session.flush()
        raise NeedsLogin

    response = await client_for(app).post("/items/half-done", follow_redirects=False)
    assert response.status_code == 303
    assert names(outside, models) == set()


@pytest.mark.parametrize("path", PATHS)
async def test_retired_session_refuses_begin_and_atomic_too(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    app = build_app(db, models, path)
    refused: list[BaseException] = []

    @app.post("/later")
    async def later(
        session: Annotated[AsyncSession, Depends(db.dependency())], tasks: BackgroundTasks
    ) -> None:
        session.add(models.Item(name="request"))

        async def after_response() -> None:
            try:
                async with session.begin():
                    session.add(models.Item(name="after-response"))
            except SessionClosedError as error:
                refused.append(error)
            if path == "middleware":  # the request's context is still current there
                try:
                    async with db.atomic():
                        pytest.fail("atomic() joined the finished request")
                except SessionClosedError as error:
                    refused.append(error)

        tasks.add_task(after_response)

    assert (await client_for(app).post("/later")).status_code == 200
    assert len(refused) == (2 if path == "middleware" else 1)
    assert names(outside, models) == {"request"}


@pytest.mark.parametrize("path", PATHS)
async def test_manual_mode_atomic_blocks_commit(
    path: str, db: SessionFactory[Any], models: Models, outside: Engine, client_for: Any
) -> None:
    # In "manual" mode nothing commits for the handler, so the outermost atomic() does.
    app = FastAPI()
    if path == "middleware":
        app.add_middleware(SessionMiddleware, factory=db, commit="manual")
    ManualDep = Annotated[AsyncSession, Depends(db.dependency(commit="manual"))]

    @app.post("/items/{name}")
    async def create(name: str, session: ManualDep) -> None:
        await session.execute(text("SELECT 1"))  # the request's transaction has begun
        async with db.atomic() as inner:
            assert inner is session
            inner.add(models.Item(name=name))

    assert (await client_for(app).post("/items/kept")).status_code == 200
    assert names(outside, models) == {"kept"}


def test_dependency_memo_key_is_the_validated_options(db: SessionFactory[Any]) -> None:
    assert db.dependency(isolation_level="serializable") is db.dependency(
        isolation_level="SERIALIZABLE"
    )


async def test_middleware_request_that_never_used_its_session_refuses_it_afterwards(
    db: SessionFactory[Any], client_for: Any
) -> None:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db)
    refused: list[BaseException] = []

    @app.get("/")
    async def index(tasks: BackgroundTasks) -> None:
        def later() -> None:
            try:
                db.current()
            except SessionClosedError as error:
                refused.append(error)

        tasks.add_task(later)

    assert (await client_for(app).get("/")).status_code == 200
    [error] = refused
    assert "open their own session" in str(error)


async def test_dependency_in_a_websocket_endpoint_commits_when_it_returns(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    from starlette.websockets import WebSocket

    app = FastAPI()

    @app.websocket("/ws")
    async def ws(
        websocket: WebSocket, session: Annotated[AsyncSession, Depends(db.dependency())]
    ) -> None:
        await websocket.accept()
        session.add(models.Item(name=await websocket.receive_text()))
        await websocket.send_text("added")
        await websocket.close()

    assert await talk_to_websocket(app, "ada") == ["added"]
    assert names(outside, models) == {"ada"}
    assert db.status().checked_out == 0


async def test_middleware_session_is_one_even_when_threads_ask_at_once(
    make_factory: Any, client_for: Any
) -> None:
    import contextvars
    import time
    from concurrent.futures import ThreadPoolExecutor

    class SlowToMake(AsyncSession):  # widens the window two threads could both make one
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.02)
            super().__init__(*args, **kwargs)

    db = make_factory(class_=SlowToMake)
    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db)

    @app.get("/threads")
    def threads() -> dict[str, int]:  # a sync endpoint: it runs in a worker thread
        barrier = threading.Barrier(8)

        def ask() -> int:
            barrier.wait()
            return id(db.current())

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(contextvars.copy_context().run, ask) for _ in range(8)]
            return {"sessions": len({future.result() for future in futures})}

    assert (await client_for(app).get("/threads")).json() == {"sessions": 1}


async def test_plain_starlette_app_with_lifespan_and_middleware(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def create(request: StarletteRequest) -> PlainTextResponse:
        db.current().add(models.Item(name=request.path_params["name"]))
        status = 201 if request.query_params.get("fail") is None else 422
        return PlainTextResponse("", status_code=status)

    app = Starlette(
        routes=[Route("/items/{name}", create, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, factory=db)],
        lifespan=db.lifespan,
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        assert (await client.post("/items/kept")).status_code == 201
        assert (await client.post("/items/dropped", params={"fail": 1})).status_code == 422
        assert names(outside, models) == {"kept"}
    assert db.status().engines == ()  # the lifespan disposed them
