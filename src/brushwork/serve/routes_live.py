"""Live mode: a WebSocket at /v1/live whose images follow the prompt as it is typed.

The client sends {"prompt", "seed", "model"?, "steps"?} messages; the server answers each message it renders with
{"prompt", "seed", "image" (base64 PNG), "ms"}, ms counted from receiving the message to sending the image. A
message that arrives while a frame renders replaces any waiting one (the generation thread holds one per
connection), so latency does not grow however fast someone types. Bad messages are answered with
{"error": {...}} and the socket stays open.

Browsers cannot set headers on a WebSocket: besides `Authorization`, the key may come as the subprotocol
`bearer.<base64url of the key>`, next to the subprotocol `brushwork`, which the server picks.
"""

import asyncio
import base64
import binascii
import json
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from brushwork.serve.common import ApiError, Service, b64_png, key_from_header, key_owner
from brushwork.serve.jobs import LiveResult, QueueFull, ShuttingDown
from brushwork.serve.schemas import MAX_PROMPT_CHARS, LiveRequest

router = APIRouter()

SUBPROTOCOL = "brushwork"
MAX_MESSAGE_CHARS = 4 * MAX_PROMPT_CHARS + 1000  # a prompt escaped in JSON, and the other fields
POLICY_VIOLATION, TRY_AGAIN_LATER, GOING_AWAY = 1008, 1013, 1001


def error_message(message: str, type: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": None}}


def _key_from_subprotocols(subprotocols: list[str]) -> str:
    for protocol in subprotocols:
        if protocol.startswith("bearer."):
            encoded = protocol.removeprefix("bearer.")
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return ""
    return ""


def _authorised(websocket: WebSocket, keys: tuple[str, ...]) -> bool:
    given = key_from_header(websocket.headers.get("authorization", "")) or \
        _key_from_subprotocols(websocket.scope.get("subprotocols", []))
    return key_owner(given, keys) is not None


def _validation_message(error: ValidationError) -> dict:
    problem = error.errors()[0]
    if problem.get("type") == "json_invalid":
        return error_message("the message is not valid JSON", param="body")
    if problem.get("type") == "model_type":
        return error_message("a message must be a JSON object like {\"prompt\": \"a red circle\", \"seed\": 1}",
                             param="body")
    param = ".".join(str(part) for part in problem.get("loc", ())) or "body"
    return error_message(f"{param}: {problem.get('msg', 'invalid value').removeprefix('Value error, ')}", param=param)


def _frame_message(result: LiveResult) -> dict:
    frame = result.frame
    if result.error is not None:
        return {"prompt": frame.prompt, "seed": frame.seed, **error_message(result.error, type="generation_error")}
    return {"prompt": frame.prompt, "seed": frame.seed, "image": b64_png(result.png)}


@router.websocket("/v1/live")
async def live(websocket: WebSocket) -> None:
    svc: Service = websocket.app.state.service
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    if not _authorised(websocket, svc.config.api_keys):
        svc.metrics.errors.labels("auth").inc()
        await websocket.send_json(error_message("missing or wrong API key: send 'Authorization: Bearer KEY' or the "
                                                "subprotocol bearer.<base64url of KEY>", type="authentication_error"))
        await websocket.close(POLICY_VIOLATION)
        return

    loop = asyncio.get_running_loop()
    outbox: asyncio.Queue = asyncio.Queue()  # one writer: frames and errors go out in order from one task

    def deliver(result: LiveResult) -> None:  # the generation thread
        loop.call_soon_threadsafe(outbox.put_nowait, result)

    try:
        session = svc.scheduler.open_live(deliver)
    except (QueueFull, ShuttingDown) as error:
        busy = isinstance(error, QueueFull)
        await websocket.send_json(error_message(
            f"this server takes {svc.config.max_live} live connections and all are open; retry later" if busy
            else "the server is shutting down", type="rate_limit_error" if busy else "server_error"))
        await websocket.close(TRY_AGAIN_LATER if busy else GOING_AWAY)
        return

    async def send_out() -> None:
        try:
            while (item := await outbox.get()) is not None:
                if isinstance(item, LiveResult):
                    message = _frame_message(item)
                    if "image" in message:
                        message["ms"] = round((time.monotonic() - item.frame.received) * 1000, 2)
                    item = message
                await websocket.send_text(json.dumps(item))
            await websocket.close(GOING_AWAY)
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client left while a message went out
            pass

    sender = asyncio.create_task(send_out())
    try:
        while True:
            text = await websocket.receive_text()
            received = time.monotonic()
            if len(text) > MAX_MESSAGE_CHARS:
                svc.metrics.errors.labels("validation").inc()
                outbox.put_nowait(error_message(f"a message may be at most {MAX_MESSAGE_CHARS} characters",
                                                param="body"))
                continue
            try:
                svc.scheduler.offer(session, svc.live_frame(LiveRequest.model_validate_json(text), received))
            except ValidationError as error:
                svc.metrics.errors.labels("validation").inc()
                outbox.put_nowait(_validation_message(error))
            except ApiError as error:
                if error.kind:
                    svc.metrics.errors.labels(error.kind).inc()
                outbox.put_nowait(error.body())
            except ShuttingDown:
                outbox.put_nowait(error_message("the server is shutting down", type="server_error"))
                outbox.put_nowait(None)
                await sender
                return
    except WebSocketDisconnect:
        pass
    finally:
        svc.scheduler.close_live(session)
        sender.cancel()
