"""Live mode (/v1/live WebSocket) through FastAPI's TestClient: frames, latest wins, errors, auth, limits,
disconnects, and fair turns with the job queue."""

import base64
import io
import time

import numpy as np
import PIL.Image
import pytest
import torch
from fastapi.testclient import TestClient
from sd_tiny import build_tiny_lcm, build_tiny_sd
from serve_helpers import GatedPipe, wait_until
from starlette.websockets import WebSocketDisconnect

from brushwork.generation.auto import BrushworkPipeline
from brushwork.serve.app import create_app
from brushwork.serve.common import Blocklist, ServeConfig

STEPS = 2


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_tiny_sd(tmp_path_factory.mktemp("live") / "tiny")
    return BrushworkPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


class RecordingPipe(GatedPipe):
    """GatedPipe that also records each call's prompts, in order: its first in .prompts, all in .batches."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.prompts: list[str] = []
        self.batches: list[list[str]] = []

    def __call__(self, prompts, **kwargs):
        prompts = prompts if isinstance(prompts, list) else [prompts]
        self.prompts.append(prompts[0])
        self.batches.append(list(prompts))
        return super().__call__(prompts, **kwargs)


def client_for(pipe, **settings) -> TestClient:
    config = ServeConfig(**{"default_steps": STEPS, "watermark": False, **settings})
    return TestClient(create_app(pipe, config))


def metric(client: TestClient, name: str, label: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and f'"{label}"' in line:
            return float(line.split()[-1])
    return 0.0


def test_frame_schema_and_pixels(pipe):
    with client_for(pipe) as client, client.websocket_connect("/v1/live") as ws:
        assert client.get("/v1/info").json()["defaults"]["live_steps"] == STEPS
        ws.send_json({"prompt": "a red circle", "seed": 7, "model": "tiny"})
        frame = ws.receive_json()
        assert set(frame) == {"prompt", "seed", "image", "ms"}
        assert (frame["prompt"], frame["seed"]) == ("a red circle", 7)
        assert 0 < frame["ms"] < 20_000
        image = PIL.Image.open(io.BytesIO(base64.b64decode(frame["image"])))
        assert image.format == "PNG" and image.size == (pipe.default_size, pipe.default_size)
        direct = pipe("a red circle", num_inference_steps=STEPS, guidance_scale=5.0, seed=7).images[0]
        assert np.abs(np.asarray(image.convert("RGB")).astype(int) - np.asarray(direct).astype(int)).max() <= 1



def test_fewer_steps_than_a_diffusion_model_is_made_for_are_refused(pipe):
    with client_for(pipe, default_steps=20) as client, client.websocket_connect("/v1/live") as ws:
        assert client.get("/v1/info").json()["defaults"]["live_steps"] == 20
        ws.send_json({"prompt": "a red circle", "seed": 7, "steps": 4})
        error = ws.receive_json()["error"]
        assert error["param"] == "steps" and "not a few-step model" in error["message"]
        assert "brushwork train distill" in error["message"]
        ws.send_json({"prompt": "a red circle", "seed": 7, "steps": 20})   # its own steps: rendered
        assert "image" in ws.receive_json()


def test_a_few_step_model_renders_its_few_steps_by_default_and_fewer_on_request(tmp_path):
    fast = BrushworkPipeline.from_pretrained(build_tiny_lcm(tmp_path / "fast"), device="cpu", dtype=torch.float32)
    with client_for(fast, default_steps=20) as client, client.websocket_connect("/v1/live") as ws:
        assert client.get("/v1/info").json()["defaults"]["live_steps"] == 4
        for steps in (None, 1):
            ws.send_json({"prompt": "a red circle", "seed": 7} | ({"steps": steps} if steps else {}))
            frame = ws.receive_json()
            image = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(frame["image"]))).convert("RGB"))
            direct = fast("a red circle", num_inference_steps=steps or 4, guidance_scale=5.0, seed=7).images[0]
            assert np.abs(image.astype(int) - np.asarray(direct).astype(int)).max() <= 1
        for field, value, message in (("negative_prompt", "blue", "no negative prompt"),
                                      ("sampler", "dpm++", "samples with lcm only")):
            response = client.post("/v1/generate", json={"prompt": "a red circle", field: value})
            assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_latest_wins_stale_messages_are_never_rendered(pipe):
    gated = RecordingPipe(pipe)
    gated.gate.clear()
    with client_for(gated) as client, client.websocket_connect("/v1/live") as ws:
        ws.send_json({"prompt": "a", "seed": 1})
        wait_until(gated.entered.is_set)
        for prompt in ("a r", "a re", "a red", "a red c"):
            ws.send_json({"prompt": prompt, "seed": 1})
        ws.send_text("{")  # its error says the server has read every message before it
        assert ws.receive_json()["error"]["param"] == "body"
        gated.gate.set()
        assert [ws.receive_json()["prompt"] for _ in range(2)] == ["a", "a red c"]
        assert gated.prompts == ["a", "a red c"]
        assert metric(client, "brushwork_live_frames_total", "dropped") == 3
        assert metric(client, "brushwork_live_frames_total", "rendered") == 2


@pytest.mark.parametrize("message, param", [
    ('{"prompt": "x"', "body"),
    ('["a red circle", 1]', "body"),
    ('{"prompt": "x"}', "seed"),
    ('{"prompt": 5, "seed": 1}', "prompt"),
    ('{"prompt": "x", "seed": -1}', "seed"),
    ('{"prompt": "x", "seed": "1"}', "seed"),
    ('{"prompt": "x", "seed": 1, "steps": 0}', "steps"),
    ('{"prompt": "x", "seed": 1, "steps": 151}', "steps"),
    ('{"prompt": "x", "seed": 1, "size": 64}', "size"),
    ('{"prompt": "x\\u0000", "seed": 1}', "prompt"),
    ('{"prompt": "' + "x" * 4001 + '", "seed": 1}', "prompt"),
    ('{"prompt": "x", "seed": 1, "model": "shapes"}', "model"),
    ('{"prompt": "a Forbidden circle", "seed": 1}', "prompt"),
])
def test_bad_messages_get_an_error_and_the_socket_stays_open(pipe, message, param):
    with client_for(pipe, blocklist=Blocklist(["forbidden"])) as client, client.websocket_connect("/v1/live") as ws:
        ws.send_text(message)
        error = ws.receive_json()["error"]
        assert error["param"] == param and error["message"]
        ws.send_json({"prompt": "a red circle", "seed": 1})
        assert ws.receive_json()["prompt"] == "a red circle"


def test_oversized_message_is_refused_unread(pipe):
    with client_for(pipe) as client, client.websocket_connect("/v1/live") as ws:
        ws.send_text(" " * 20_000)
        assert "at most" in ws.receive_json()["error"]["message"]


def test_api_key_by_header_or_subprotocol(pipe):
    key = "s3cret/key+"
    encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    with client_for(pipe, api_keys=(key,)) as client:
        for headers, protocols in (({}, []), ({"Authorization": "Bearer wrong"}, []), ({}, ["brushwork", "bearer.eA"])):
            with client.websocket_connect("/v1/live", headers=headers, subprotocols=protocols) as ws:
                assert ws.receive_json()["error"]["type"] == "authentication_error"
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == 1008
        with client.websocket_connect("/v1/live", headers={"Authorization": f"Bearer {key}"}) as ws:
            ws.send_json({"prompt": "a", "seed": 1})
            assert "image" in ws.receive_json()
        with client.websocket_connect("/v1/live", subprotocols=["brushwork", f"bearer.{encoded}"]) as ws:
            assert ws.accepted_subprotocol == "brushwork"
            ws.send_json({"prompt": "a", "seed": 1})
            assert "image" in ws.receive_json()


def test_connections_beyond_max_live_are_refused(pipe):
    with client_for(pipe, max_live=1) as client, client.websocket_connect("/v1/live"):
        with client.websocket_connect("/v1/live") as second:
            assert second.receive_json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(WebSocketDisconnect) as closed:
                second.receive_json()
            assert closed.value.code == 1013


def test_a_disconnect_cancels_the_rendering_frame_and_frees_the_connection(pipe):
    gated = RecordingPipe(pipe)
    gated.gate.clear()
    with client_for(gated) as client:
        with client.websocket_connect("/v1/live") as ws:
            ws.send_json({"prompt": "a", "seed": 1})
            wait_until(gated.entered.is_set)
            ws.send_json({"prompt": "ab", "seed": 1})
            assert client.app.state.service.scheduler.live_count() == 1
        wait_until(lambda: client.app.state.service.scheduler.live_count() == 0)
        gated.gate.set()
        wait_until(lambda: metric(client, "brushwork_live_frames_total", "cancelled") == 1)
        assert gated.prompts == ["a"]  # the waiting frame was dropped, not rendered
        assert metric(client, "brushwork_live_frames_total", "dropped") == 1


@pytest.mark.parametrize("max_batch, calls", [
    (8, [["live 1"], ["job"], ["live 2", "other 1"]]),      # the round's frames share one call (stream batch)
    (1, [["live 1"], ["job"], ["live 2"], ["other 1"]]),
])
def test_live_frames_and_queued_jobs_take_fair_turns(pipe, max_batch, calls):
    gated = RecordingPipe(pipe)
    gated.gate.clear()
    with client_for(gated, max_batch=max_batch) as client, client.websocket_connect("/v1/live") as first, \
            client.websocket_connect("/v1/live") as second:
        first.send_json({"prompt": "live 1", "seed": 1})
        wait_until(gated.entered.is_set)
        job = client.post("/v1/generate", json={"prompt": "job", "seed": 1, "steps": STEPS}).json()
        first.send_json({"prompt": "live 2", "seed": 1})
        second.send_json({"prompt": "other 1", "seed": 1})
        first.send_text("{")  # wait until both connections' messages are in
        second.send_text("{")
        assert "error" in first.receive_json() and "error" in second.receive_json()
        gated.gate.set()
        assert [first.receive_json()["prompt"] for _ in range(2)] == ["live 1", "live 2"]
        other = second.receive_json()
        assert other["prompt"] == "other 1"
        shared = PIL.Image.open(io.BytesIO(base64.b64decode(other["image"])))
        assert gated.batches == calls
        if max_batch > 1:   # a frame rendered in a shared call is the frame it would be alone
            direct = pipe("other 1", num_inference_steps=STEPS, guidance_scale=5.0, seed=1).images[0]
            assert np.abs(np.asarray(shared.convert("RGB")).astype(int) - np.asarray(direct).astype(int)).max() <= 1
        assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded"


def test_generate_jobs_finish_while_a_client_types_without_pause(pipe):
    with client_for(pipe) as client, client.websocket_connect("/v1/live") as ws:
        job = client.post("/v1/generate", json={"prompt": "a blue square", "seed": 3, "steps": STEPS}).json()
        typed, frames = "a red circle above a blue square", 0
        deadline = time.monotonic() + 15
        for end in range(1, len(typed) + 1):
            ws.send_json({"prompt": typed[:end], "seed": 1})
        while client.get(f"/v1/jobs/{job['id']}").json()["state"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while True:  # the last keystroke always gets its frame
            frame = ws.receive_json()
            frames += 1
            if frame["prompt"] == typed:
                break
        assert 1 <= frames <= len(typed)
