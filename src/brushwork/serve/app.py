"""The FastAPI app of `brushwork serve`: routes, error shape, the web page, and the generation thread's life."""

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from brushwork import __version__
from brushwork.generation.base import Text2ImagePipeline
from brushwork.serve import routes_a1111, routes_live, routes_native, routes_openai, routes_ops
from brushwork.serve.common import ApiError, ServeConfig, Service, require_api_key
from brushwork.serve.connections import MAX_HEADER_BYTES

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("brushwork.serve")


def _error(request: Request, status: int, body: dict, kind: str | None, headers: dict | None = None) -> JSONResponse:
    if kind is not None:
        request.app.state.service.metrics.errors.labels(kind).inc()
    return JSONResponse(body, status_code=status, headers=headers)


def _field(location: tuple) -> str:
    """`steps`, `size` or `body` from a pydantic error location like ("body", "steps")."""
    parts = [str(part) for part in location[1:] if not isinstance(part, int)] if len(location) > 1 else []
    return ".".join(parts) or "body"


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return _error(request, error.status, error.body(), error.kind, error.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for problem in error.errors():
        field = _field(tuple(problem.get("loc", ())))
        message = problem.get("msg", "invalid value").removeprefix("Value error, ")
        if field == "body" and problem.get("type") in ("missing", "model_attributes_type", "dict_type"):
            message = "the request body must be a JSON object"
        elif problem.get("type") == "json_invalid":
            field, message = "body", f"the request body is not valid JSON ({problem.get('ctx', {}).get('error', '')})"
        problems.append({"param": field, "message": message})
    first = problems[0] if problems else {"param": "body", "message": "invalid request"}
    body = {"error": {"message": f"{first['param']}: {first['message']}", "type": "invalid_request_error",
                      "param": first["param"], "code": "invalid_value", "details": problems}}
    return _error(request, 422, body, "validation")


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    if error.status_code == 413:  # a streamed body passed BodyLimit's limit
        body = {"error": {"message": str(error.detail), "type": "invalid_request_error", "param": "body",
                          "code": "body_too_large"}}
        return _error(request, 413, body, "too_large")
    body = {"error": {"message": str(error.detail), "type": "not_found" if error.status_code == 404 else "http_error",
                      "param": None, "code": None}}
    return _error(request, error.status_code, body, None, getattr(error, "headers", None))


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, before it is read. A Content-Length above it
    is answered at once; a streamed (chunked) body is counted as the route reads it and stopped when it passes."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.limit:,} bytes",
                        param="body", kind="too_large", code="body_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            response = await _api_error(Request(scope), self._error())
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # FastAPI turns other exceptions raised while reading the body into 400
                raise StarletteHTTPException(413, self._error().message)
            return message

        await self.app(scope, counted_receive, send)


class HeaderLimit:
    """ASGI middleware: 431 for a request whose headers hold more than `limit` bytes."""

    def __init__(self, app, limit: int = MAX_HEADER_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > self.limit:
            error = ApiError(431, f"the request headers are larger than this server's limit of {self.limit:,} bytes",
                             param="headers", kind="too_large", code="headers_too_large")
            response = await _api_error(Request(scope), error)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class HostCheck:
    """ASGI middleware: 400 for a request whose Host header names none of `allowed` (a web page on another
    site could otherwise reach a loopback server through DNS rebinding)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {host.lower() for host in allowed}

    async def __call__(self, scope, receive, send) -> None:
        header = dict(scope["headers"]).get(b"host") if scope["type"] in ("http", "websocket") else None
        if header is not None:
            host = header.decode("latin-1").lower()
            name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name not in self.allowed:
                names = ", ".join(sorted(self.allowed))
                error = ApiError(400, f"Host {name!r} is not a name this server answers to ({names}); serve "
                                      "--allowed-host NAME adds one", param="Host", code="host_not_allowed")
                response = await _api_error(Request(scope), error)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    body = {"error": {"message": f"internal error: {type(error).__name__}", "type": "server_error", "param": None,
                      "code": None}}
    return _error(request, 500, body, "internal")


def create_app(pipe: Text2ImagePipeline, config: ServeConfig | None = None) -> FastAPI:
    """The app for one loaded pipeline. The generation thread starts and stops with the app's lifespan."""
    config = config or ServeConfig()
    service = Service(pipe, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        yield
        await asyncio.to_thread(service.scheduler.shutdown, config.shutdown_grace)

    # The interactive docs pages load scripts from a CDN; the schema stays at /openapi.json.
    app = FastAPI(title="brushwork", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

    protected = [Depends(require_api_key)]
    app.include_router(routes_ops.router)
    app.include_router(routes_native.router, dependencies=protected)
    app.include_router(routes_openai.router, dependencies=protected)
    app.include_router(routes_a1111.router, dependencies=protected)
    app.include_router(routes_live.router)  # checks the key itself: a browser's WebSocket cannot send the header

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimit, limit=config.max_body)
    app.add_middleware(HeaderLimit)
    if config.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=config.allowed_hosts)
    return app
