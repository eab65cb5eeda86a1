"""brushwork serve through FastAPI's TestClient: native API, batching, cancellation, limits, auth, errors."""

import base64
import io
import json
import math
import socket
import time

import numpy as np
import PIL.Image
import pytest
import torch
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner
from sd_tiny import build_tiny_sd
from serve_helpers import GatedPipe, SlowStepPipe, live_server, wait_until

from brushwork.commands.serve import is_loopback, loopback_hosts, serve
from brushwork.errors import BrushworkError
from brushwork.generation.auto import BrushworkPipeline
from brushwork.pnginfo import parse_parameters
from brushwork.serve.app import STATIC_DIR, create_app
from brushwork.serve.common import Blocklist, ServeConfig
from brushwork.serve.jobs import compiled_batch_sizes, padded_batch_size, warm_up
from brushwork.watermark import detect

STEPS = 3


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_tiny_sd(tmp_path_factory.mktemp("serve") / "tiny")
    return BrushworkPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def client_for(pipe, **settings) -> TestClient:
    config = ServeConfig(**{"default_steps": STEPS, "preview_every": 1, **settings})
    return TestClient(create_app(pipe, config))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def direct(pipe, seed: int, n: int = 1, prompt: str = "a red circle") -> list[np.ndarray]:
    out = pipe(prompt, num_inference_steps=STEPS, guidance_scale=5.0, seed=seed, num_images_per_prompt=n)
    return [np.asarray(image).astype(int) for image in out.images]


def wait_done(client: TestClient, job_id: str, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + 30
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def read_events(client: TestClient, job_id: str) -> list[tuple[str, dict]]:
    events, name = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_generate_follow_and_fetch_pngs(pipe):
    with client_for(pipe) as client:
        response = client.post("/v1/generate", json={"prompt": "a red circle", "n": 2, "seed": 11})
        assert response.status_code == 202
        job_id = response.json()["id"]
        assert response.headers["location"] == f"/v1/jobs/{job_id}"

        events = read_events(client, job_id)
        names = [name for name, _ in events]
        assert names[-1] == "done" and set(names[:-1]) == {"progress"}
        steps_seen = [data["step"] for name, data in events if name == "progress"]
        assert steps_seen == sorted(steps_seen) and max(steps_seen) == STEPS
        previews = [data["preview"] for name, data in events if "preview" in data]
        assert previews and all(p.startswith("data:image/png;base64,") for p in previews)
        job = events[-1][1]
        assert job["state"] == "succeeded" and len(job["images"]) == 2

        for k, image in enumerate(job["images"]):
            png = client.get(image["url"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            opened = PIL.Image.open(io.BytesIO(png.content))
            params = parse_parameters(opened.info["parameters"])
            assert (params["prompt"], params["seed"], params["steps"]) == ("a red circle", 11 + k, STEPS)
            assert opened.size == (pipe.default_size, pipe.default_size)
            assert detect(opened).found  # watermarked by default
        assert client.get(f"/v1/jobs/{job_id}/images/2.png").status_code == 404
        assert client.get("/v1/jobs/nope").json()["error"]["param"] == "id"


def test_no_watermark_gives_the_pipeline_images(pipe):
    with client_for(pipe, watermark=False) as client:
        job = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 4}).json()
        job = wait_done(client, job["id"])
        got = pixels(client.get(job["images"][0]["url"]).content)
    assert np.abs(got - direct(pipe, 4)[0]).max() <= 1
    assert not detect(PIL.Image.fromarray(got.astype(np.uint8))).found


def test_compatible_jobs_share_one_batch_and_keep_their_seeds(pipe):
    gated = GatedPipe(pipe)
    gated.gate.clear()
    with client_for(gated, watermark=False) as client:
        first = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 1}).json()
        wait_until(gated.entered.is_set)
        together = [client.post("/v1/generate", json={"prompt": prompt, "seed": seed, "n": n}).json()
                    for prompt, seed, n in (("a red circle", 5, 2), ("blue", 9, 1))]
        alone = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 1, "steps": 2}).json()
        assert client.get(f"/v1/jobs/{together[1]['id']}").json()["queue_position"] == 2
        gated.gate.set()
        jobs = [wait_done(client, job["id"]) for job in [first, *together, alone]]
        assert [job["state"] for job in jobs] == ["succeeded"] * 4
        assert gated.calls == [1, 3, 1]  # the two compatible jobs ran in one 3-image UNet batch
        batched = [pixels(client.get(image["url"]).content) for image in jobs[1]["images"]]
    for got, want in zip(batched, direct(pipe, 5, n=2)):
        assert np.abs(got - want).max() <= 2  # same seeds as alone; batch size only changes float rounding


def test_compiled_pipelines_get_batches_filled_to_a_compiled_size(pipe):
    gated = GatedPipe(pipe)
    gated.compiled = True  # what a compiled pipeline reports; the padding does not need real compiling
    gated.gate.clear()
    with client_for(gated, watermark=False, max_batch=8) as client:
        first = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 1}).json()
        wait_until(gated.entered.is_set)
        together = [client.post("/v1/generate", json={"prompt": prompt, "seed": seed, "n": n}).json()
                    for prompt, seed, n in (("a red circle", 5, 2), ("blue", 9, 1))]
        gated.gate.set()
        jobs = [wait_done(client, job["id"]) for job in [first, *together]]
        assert [job["state"] for job in jobs] == ["succeeded"] * 3
        assert gated.calls == [1, 4]  # 3 images filled up to 4; the copy is dropped
        assert [len(job["images"]) for job in jobs] == [1, 2, 1]
        assert [image["seed"] for job in jobs for image in job["images"]] == [1, 5, 6, 9]
        batched = [pixels(client.get(image["url"]).content) for image in jobs[1]["images"]]
    for got, want in zip(batched, direct(pipe, 5, n=2)):
        assert np.abs(got - want).max() <= 2


def test_compiled_batch_sizes_and_warm_up():
    assert compiled_batch_sizes(8) == [1, 2, 4, 8] and compiled_batch_sizes(6) == [1, 2, 4, 6]
    assert compiled_batch_sizes(1) == [1]
    assert [padded_batch_size(n, [1, 2, 4, 8]) for n in (1, 3, 5, 8, 11)] == [1, 4, 8, 8, 11]
    calls = []
    warm_up(lambda prompts, **kwargs: calls.append((len(prompts), kwargs["guidance_scale"])), [1, 2, 4], 5.0)
    assert calls == [(1, 5.0), (2, 5.0), (4, 5.0)]


def test_cancel_queued_and_running_jobs(pipe):
    gated = GatedPipe(pipe)
    gated.gate.clear()
    with client_for(gated) as client:
        running = client.post("/v1/generate", json={"prompt": "a", "seed": 1}).json()
        wait_until(gated.entered.is_set)
        queued = client.post("/v1/generate", json={"prompt": "b", "steps": 2}).json()
        assert client.delete(f"/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
        assert client.get("/ready").json()["queue_depth"] == 0
        cancelled = client.delete(f"/v1/jobs/{running['id']}").json()
        assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled by the client"
        gated.gate.set()
        app_scheduler = client.app.state.service.scheduler
        wait_until(lambda: not app_scheduler.running())
        assert client.get(f"/v1/jobs/{running['id']}").json()["images"] == []
        after = wait_done(client, client.post("/v1/generate", json={"prompt": "c"}).json()["id"])
        assert after["state"] == "succeeded"
        assert 'brushwork_jobs_finished_total{state="cancelled"} 2.0' in client.get("/metrics").text


def test_full_queue_answers_429_with_retry_after(pipe):
    gated = GatedPipe(pipe)
    gated.gate.clear()
    with client_for(gated, max_queue=2) as client:
        client.post("/v1/generate", json={"prompt": "running"})
        wait_until(gated.entered.is_set)
        for _ in range(2):
            assert client.post("/v1/generate", json={"prompt": "queued"}).status_code == 202
        refused = client.post("/v1/generate", json={"prompt": "one too many"})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        gated.gate.set()
        assert 'brushwork_errors_total{kind="queue_full"} 1.0' in client.get("/metrics").text


def test_jobs_time_out(pipe):
    gated = GatedPipe(pipe)
    gated.gate.clear()
    with client_for(gated, timeout=0.3) as client:
        running = client.post("/v1/generate", json={"prompt": "a"}).json()
        wait_until(gated.entered.is_set)
        queued = client.post("/v1/generate", json={"prompt": "b", "steps": 2}).json()
        time.sleep(0.5)
        gated.gate.set()
        running, queued = wait_done(client, running["id"]), wait_done(client, queued["id"])
        assert running["state"] == "failed" and "timed out" in running["error"]
        assert queued["state"] == "failed" and "waiting in the queue" in queued["error"]


def test_cancel_and_timeout_stop_a_job_inside_a_long_step(pipe):
    slow = SlowStepPipe(pipe, seconds=30)
    with client_for(slow) as client:
        scheduler = client.app.state.service.scheduler
        job = client.post("/v1/generate", json={"prompt": "a"}).json()
        wait_until(slow.entered.is_set)
        time.sleep(0.3)  # inside the step: no step callback comes for 30 s
        started = time.monotonic()
        assert client.delete(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        wait_until(lambda: not scheduler.running(), timeout=10)
        assert time.monotonic() - started < 1.0
    slow = SlowStepPipe(pipe, seconds=30)
    with client_for(slow, timeout=0.5) as client:
        started = time.monotonic()
        job = wait_done(client, client.post("/v1/generate", json={"prompt": "a"}).json()["id"])
        assert job["state"] == "failed" and "timed out after 0.5 s" in job["error"]
        assert time.monotonic() - started < 1.5


def test_a1111_progress_is_true_while_a_job_runs_and_while_it_stops(pipe):
    slow = SlowStepPipe(pipe, seconds=0)
    slow.gate.clear()  # the generation thread is busy and reaches no step
    with client_for(slow) as client:
        job = client.post("/v1/generate", json={"prompt": "a"}).json()
        wait_until(slow.entered.is_set)
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["state"]["job"] == "generating" and progress["textinfo"] == f"step 0 of {STEPS}"
        assert job["id"] not in json.dumps(progress)  # an id would open the job (and its prompt) to anyone
        assert progress["state"]["sampling_steps"] == STEPS and not progress["state"]["interrupted"]
        client.delete(f"/v1/jobs/{job['id']}")
        stopping = client.get("/sdapi/v1/progress").json()  # cancelled, but the thread has not stopped yet
        assert stopping["state"]["interrupted"] and stopping["state"]["job_count"] == 1
        assert stopping["textinfo"] == "stopping a cancelled job"
        slow.gate.set()
        wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0)


def test_size_and_cost_limits_answer_400_before_queueing(pipe):
    with client_for(pipe) as client:  # the tiny model makes 32 px images: sides up to 64, 32*32*1200 pixel-steps
        info = client.get("/v1/info").json()["limits"]
        assert info["side"] == 64 and info["cost"] == 32 * 32 * 1200
        for path, body, param in [("/v1/generate", {"prompt": "a", "width": 72}, "width"),
                                  ("/v1/images/generations", {"prompt": "a", "size": "1024x1024"}, "size"),
                                  ("/sdapi/v1/txt2img", {"prompt": "a", "height": 128}, "height")]:
            response = client.post(path, json=body)
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            assert error["param"] == param and error["code"] == "size_limit" and error["limit"] == 64
            assert "--max-size" in error["message"]
        response = client.post("/v1/generate", json={"prompt": "a", "width": 64, "height": 64, "steps": 150, "n": 16})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "cost_limit" and error["cost"] == 64 * 64 * 150 * 16 and error["limit"] == 32 * 32 * 1200
        assert f"{64 * 64 * 150 * 16:,} pixel-steps" in error["message"] and f"{32 * 32 * 1200:,}" in error["message"]
        response = client.post("/v1/images/generations", json={"prompt": "a", "size": "64x64", "n": 16, "steps": 150})
        assert response.json()["error"]["code"] == "cost_limit"
        assert client.get("/ready").json()["queue_depth"] == 0
        assert 'brushwork_errors_total{kind="too_costly"} 5.0' in client.get("/metrics").text
    with client_for(pipe, max_side=128, max_cost=64 * 64 * 150 * 16) as client:
        response = client.post("/v1/generate", json={"prompt": "a", "width": 64, "height": 64, "steps": 150, "n": 16})
        assert response.status_code == 202
        client.delete(f"/v1/jobs/{response.json()['id']}")
    with pytest.raises(BrushworkError, match="refuse tiny.s own request"):
        create_app(pipe, ServeConfig(max_side=16))


def test_request_bodies_above_the_limit_get_413_before_they_are_read(pipe):
    with client_for(pipe, max_body=1000) as client:
        response = client.post("/v1/generate", json={"prompt": "a" * 2000})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large" and "1,000 bytes" in response.json()["error"]["message"]
        chunks = [b'{"prompt": "', b"a" * 600, b"a" * 600, b'"}']
        response = client.post("/v1/generate", content=iter(chunks), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["param"] == "body"
        small = client.post("/v1/generate", content=iter([b'{"prompt": ', b'"a"}']),
                            headers={"content-type": "application/json"})
        assert small.status_code == 202
        assert 'brushwork_errors_total{kind="too_large"} 2.0' in client.get("/metrics").text
    with client_for(pipe) as client:  # the default: about 1 MB
        assert client.post("/v1/generate", json={"prompt": "a" * 1_100_000}).status_code == 413
    with live_server(create_app(pipe, ServeConfig())) as (url, _):  # 200 MB announced, none sent
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 200000000\r\n\r\n")
            assert connection.recv(1000).startswith(b"HTTP/1.1 413")


def test_a_loopback_server_answers_only_its_own_host_names(pipe):
    hosts = loopback_hosts("127.0.0.1", ["box.local"])
    assert hosts == ("localhost", "127.0.0.1", "[::1]", "box.local")
    with client_for(pipe, allowed_hosts=hosts, public_url="http://127.0.0.1:7860") as client:
        for name in ["localhost:7860", "127.0.0.1", "[::1]:7860", "BOX.local"]:
            assert client.get("/health", headers={"host": name}).status_code == 200, name
        refused = client.get("/v1/info", headers={"host": "attacker.example:7860"})  # DNS rebinding
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed"
        assert "'attacker.example'" in refused.json()["error"]["message"]
        data = client.post("/v1/images/generations", json={"prompt": "a", "response_format": "url"},
                           headers={"host": "localhost"}).json()
        assert data["data"][0]["url"].startswith("http://127.0.0.1:7860/v1/jobs/")  # not from the Host header


HUNDRED_KB = "a" * 100_000
BAD_REQUESTS = [
    ("/v1/generate", {}, "prompt"),
    ("/v1/generate", {"prompt": 5}, "prompt"),
    ("/v1/generate", {"prompt": "a", "steps": "5"}, "steps"),
    ("/v1/generate", {"prompt": "a", "steps": 0}, "steps"),
    ("/v1/generate", {"prompt": "a", "steps": 10_000}, "steps"),
    ("/v1/generate", {"prompt": "a", "n": 0}, "n"),
    ("/v1/generate", {"prompt": "a", "n": 1000}, "n"),
    ("/v1/generate", {"prompt": "a", "width": 36}, "width"),
    ("/v1/generate", {"prompt": "a", "height": 4096}, "height"),
    ("/v1/generate", {"prompt": "a", "guidance": "high"}, "guidance"),
    ("/v1/generate", '{"prompt": "a", "guidance": NaN}', "guidance"),
    ("/v1/generate", '{"prompt": "a", "guidance": Infinity}', "guidance"),
    ("/v1/generate", {"prompt": HUNDRED_KB}, "prompt"),
    ("/v1/generate", {"prompt": "red\x07circle"}, "prompt"),
    ("/v1/generate", {"prompt": "a", "negative_prompt": "\x1b[31m"}, "negative_prompt"),
    ("/v1/generate", {"prompt": "a", "seed": -2}, "seed"),
    ("/v1/generate", {"prompt": "a", "sampler": "nope"}, "sampler"),
    ("/v1/generate", {"prompt": "a", "stepz": 4}, "stepz"),
    ("/v1/generate", [1, 2], "body"),
    ("/v1/generate", "", "body"),
    ("/v1/generate", "{not json", "body"),
    ("/v1/images/generations", {"prompt": "a", "size": "big"}, "size"),
    ("/v1/images/generations", {"prompt": "a", "size": "30x30"}, "size"),
    ("/v1/images/generations", {"prompt": "a", "n": 1000}, "n"),
    ("/v1/images/generations", {"prompt": "a", "response_format": "gif"}, "response_format"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "batch_size": 10, "n_iter": 10}, "n_iter"),
    ("/sdapi/v1/txt2img", '{"prompt": "a", "cfg_scale": NaN}', "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "steps": 10_000}, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "Karras 9000"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "scheduler": "Karras"}, "scheduler"),
    ("/sdapi/v1/png-info", {"image": "not base64!"}, "image"),
    ("/sdapi/v1/png-info", {"image": "aGVsbG8="}, "image"),  # "hello": base64, not an image
    ("/sdapi/v1/options", {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}, "sd_model_checkpoint"),
    ("/v1/images/generations", {"prompt": "a", "model": "midjourney"}, "model"),
]


def test_bad_input_is_answered_4xx_naming_the_field(pipe):
    with client_for(pipe) as client:
        for path, body, field in BAD_REQUESTS:
            if isinstance(body, str):
                response = client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = client.post(path, json=body)
            assert 400 <= response.status_code < 500, (path, body, response.status_code)
            error = response.json()["error"]
            assert error["param"] == field, (body, error)
            assert field in error["message"]
        assert client.get("/health").json() == {"status": "ok"}
        job = client.post("/v1/generate", json={"prompt": "still here"}).json()
        assert wait_done(client, job["id"])["state"] == "succeeded"
        assert 'brushwork_errors_total{kind="validation"}' in client.get("/metrics").text


def test_api_key(pipe):
    with client_for(pipe, api_keys=("s3cret",)) as client:
        assert client.get("/v1/info").status_code == 401
        assert client.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.post("/sdapi/v1/txt2img", json={}).status_code == 401
        assert client.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).json()["model"] == "tiny"
        assert client.get("/sdapi/v1/sd-models", auth=("anyone", "s3cret")).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        assert client.get("/").status_code == 200  # the page asks for the key itself


def test_jobs_belong_to_the_key_that_submitted_them(pipe):
    gated = GatedPipe(pipe, delay=0.02)
    gated.gate.clear()
    alice, bob = ({"Authorization": f"Bearer {key}"} for key in ("alice-key", "bob-key"))
    with client_for(gated, api_keys=("alice-key", "bob-key")) as client:
        job = client.post("/v1/generate", json={"prompt": "alice's secret"}, headers=alice).json()
        assert len(job["id"]) >= 20  # 128 random bits
        wait_until(gated.entered.is_set)
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events"), ("GET", "/images/0.png")):
            response = client.request(method, f"/v1/jobs/{job['id']}{path}", headers=bob)
            assert response.status_code == 404 and "secret" not in response.text
        progress = client.get("/sdapi/v1/progress", headers=bob).json()
        assert progress["state"]["job"] == "generating" and progress["current_image"] is None  # busy, but not his
        assert job["id"] not in json.dumps(progress)
        client.post("/sdapi/v1/interrupt", headers=bob)  # stops only his own jobs: none
        assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["state"] == "running"
        gated.gate.set()
        assert client.get(f"/v1/jobs/{job['id']}/events", headers=alice).status_code == 200
        assert wait_done(client, job["id"], alice)["state"] == "succeeded"
        assert client.get(f"/v1/jobs/{job['id']}/images/0.png", headers=alice).status_code == 200


def test_blocklist_rejects_prompts_with_reason(pipe, tmp_path):
    path = tmp_path / "blocklist.txt"
    path.write_text("# words this server refuses\nForbidden Thing\nbad\n")
    blocklist = Blocklist.from_file(path)
    assert blocklist.match("a ＦＯＲＢＩＤＤＥＮ   thing, drawn") == "forbidden thing"
    assert blocklist.match("a badge") is None
    with client_for(pipe, blocklist=blocklist) as client:
        refused = client.post("/v1/generate", json={"prompt": "something BAD here"})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "prompt" and "'bad'" in refused.json()["error"]["message"]
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "bad"}).status_code == 400
        assert client.post("/v1/generate", json={"prompt": "a badge", "negative_prompt": "a badge"}).status_code == 202
        refused = client.post("/v1/generate", json={"prompt": "a badge", "negative_prompt": "bad"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "negative_prompt"


def test_blocklist_sees_through_invisible_characters_and_look_alike_letters():
    blocklist = Blocklist(["circle", "Big Square"])
    cases = {"a cir\u200bcle": "circle",  # zero-width space
             "a cir\u00adcle": "circle",  # soft hyphen
             "a \u0441ircle": "circle",  # Cyrillic small es
             "A CIRCL\u0415": "circle",  # Cyrillic capital ie
             "\uff43\uff49\uff52\uff43\uff4c\uff45": "circle",  # fullwidth letters
             "a big\u2060 \u0455quare": "big square",  # word joiner, Cyrillic dze
             "a ci\u0433cle": None}  # Cyrillic ghe looks like no Latin letter
    for prompt, expected in cases.items():
        assert blocklist.match(prompt) == expected, ascii(prompt)
    assert blocklist.match("circles and big squares") is None  # whole words only
    assert blocklist.match("\u043a\u0440\u0443\u0433") is None  # Russian for circle is not the English word


def test_metrics_and_ops(pipe):
    with client_for(pipe) as client:
        assert client.get("/ready").json()["ready"] is True
        job = client.post("/v1/generate", json={"prompt": "a", "n": 2}).json()
        wait_done(client, job["id"])
        client.post("/v1/generate", json={"prompt": "a", "steps": 0})
        text = client.get("/metrics").text
        assert "brushwork_images_generated_total 2.0" in text
        assert "brushwork_queue_depth 0.0" in text
        assert 'brushwork_job_latency_seconds_count{api="native",state="succeeded"} 1.0' in text
        assert 'brushwork_errors_total{kind="validation"} 1.0' in text
        assert "brushwork_batch_images_bucket" in text


def test_shutdown_finishes_running_and_cancels_queued(pipe):
    gated = GatedPipe(pipe)
    gated.gate.clear()
    with client_for(gated) as client:
        service = client.app.state.service
        running = client.post("/v1/generate", json={"prompt": "a"}).json()
        wait_until(gated.entered.is_set)
        queued = client.post("/v1/generate", json={"prompt": "b", "steps": 2}).json()
        service.scheduler.begin_shutdown(grace=10)
        assert client.get("/ready").status_code == 503
        refused = client.post("/v1/generate", json={"prompt": "late"})
        assert refused.status_code == 503
        gated.gate.set()
        assert wait_done(client, running["id"])["state"] == "succeeded"
        queued = client.get(f"/v1/jobs/{queued['id']}").json()
        assert queued["state"] == "cancelled" and "shutting down" in queued["error"]


def test_shutdown_grace_expiry_cancels_the_running_batch(pipe):
    gated = GatedPipe(pipe)
    gated.gate.clear()
    client = client_for(gated)
    with client:
        job = client.post("/v1/generate", json={"prompt": "a"}).json()
        wait_until(gated.entered.is_set)
        scheduler = client.app.state.service.scheduler
        scheduler.begin_shutdown(grace=0.0)
        gated.gate.set()
    # leaving the TestClient ran the lifespan shutdown, which joined the generation thread
    state = scheduler.get(job["id"])
    assert state.state == "cancelled" and "shut down" in state.error
    assert not scheduler.ready


def test_page_and_assets_are_served_locally(pipe):
    with client_for(pipe) as client:
        page = client.get("/")
        assert page.status_code == 200 and 'id="prompt"' in page.text
        for name in ("app.js", "app.css"):
            assert client.get(f"/static/{name}").status_code == 200
        assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN
    for path in STATIC_DIR.iterdir():
        assert "http://" not in path.read_text() and "https://" not in path.read_text(), path


def test_openai_and_a1111_answer_in_their_shapes(pipe):
    with client_for(pipe) as client:
        data = client.post("/v1/images/generations", json={"prompt": "a", "n": 2, "size": "32x32", "seed": 3,
                                                           "response_format": "b64_json"}).json()
        assert len(data["data"]) == 2 and math.isclose(data["created"], time.time(), abs_tol=60)
        body = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "seed": 8, "batch_size": 2, "n_iter": 2,
                                                      "steps": 2, "cfg_scale": 3, "sampler_name": "Euler a"}).json()
        info = json.loads(body["info"])
        assert len(body["images"]) == 4 and info["all_seeds"] == [8, 9, 10, 11]
        assert info["sampler_name"] == "Euler a" and parse_parameters(info["infotexts"][3])["seed"] == 11
        models = client.get("/sdapi/v1/sd-models").json()
        assert models[0]["model_name"] == "tiny" and models[0]["hash"] in models[0]["title"]
        assert models[0]["filename"] == "tiny"  # not the server's file path
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_a1111_options_png_info_and_schedulers(pipe):
    with client_for(pipe) as client:
        title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        for name in (title, "tiny"):
            assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}).status_code == 200
        assert client.post("/sdapi/v1/options", json={"samples_save": False}).status_code == 200
        refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes"})
        assert refused.status_code == 400 and "sd_model_checkpoint 'shapes'" in refused.json()["error"]["message"]
        assert client.get("/sdapi/v1/schedulers").json()[0]["name"] == "automatic"

        body = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "seed": 8, "steps": 2, "width": 32,
                                                      "height": 32, "scheduler": "Automatic"}).json()
        for image in (body["images"][0], "data:image/png;base64," + body["images"][0]):
            info = client.post("/sdapi/v1/png-info", json={"image": image}).json()
            assert info["info"] == json.loads(body["info"])["infotexts"][0]
            assert info["parameters"]["Prompt"] == "a" and info["parameters"]["Seed"] == 8
            assert (info["parameters"]["Size-1"], info["parameters"]["Steps"]) == (32, 2)
        plain = io.BytesIO()
        PIL.Image.new("RGB", (8, 8)).save(plain, format="PNG")
        empty = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(plain.getvalue()).decode()})
        assert empty.json() == {"info": "", "items": {}, "parameters": {}}


def test_seed_minus_one_is_random_and_openai_model_names_are_checked(pipe):
    with client_for(pipe) as client:
        job = client.post("/v1/generate", json={"prompt": "a", "seed": -1}).json()
        assert 0 <= job["request"]["seed"] < 2**32
        for model in ("tiny", "dall-e-3", None):
            body = {"prompt": "a", "seed": -1, "size": "32x32", "response_format": "b64_json", "model": model}
            data = client.post("/v1/images/generations", json=body).json()["data"]
            png = PIL.Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"])))
            assert 0 <= parse_parameters(png.info["parameters"])["seed"] < 2**32
        refused = client.post("/v1/images/generations", json={"prompt": "a", "model": "gpt-4o"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_found"
        assert "runs the model 'tiny'" in refused.json()["error"]["message"]


def test_serve_command_refuses_bad_setups_before_loading(tmp_path):
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.5", "example.org"]))
    with pytest.raises(BrushworkError, match="--api-key"):
        serve(host="0.0.0.0")
    with pytest.raises(BrushworkError, match="blocklist file not found"):
        serve(blocklist=tmp_path / "missing.txt")
    with pytest.raises(BrushworkError, match="--max-queue must be positive"):
        serve(max_queue=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BrushworkError, match="pick another --port"):
            serve(port=taken.getsockname()[1])
    with pytest.raises(BrushworkError, match="model not found"):
        serve(host="0.0.0.0", api_key=["k"], port=0, model=tmp_path / "no-such-model")

    app = typer.Typer()
    app.command("serve")(serve)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["serve", "--host", "10.0.0.1", "--no-watermark", "--port", "0"])
    assert isinstance(result.exception, BrushworkError) and "--insecure" in str(result.exception)


def test_a_gan_is_served_in_one_step_whatever_the_request_asks():
    gan = BrushworkPipeline.from_pretrained("shapes-gan", device="cpu", dtype=torch.float32)
    with client_for(gan) as client:  # previews every step: a GAN has no latents to preview
        assert client.get("/v1/info").json()["defaults"]["steps"] == 1
        for asked in ({}, {"steps": 7}):
            response = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 3, **asked})
            job = wait_done(client, response.json()["id"])
            assert job["state"] == "succeeded", job
            assert job["request"]["steps"] == 1 and job["progress"] == {"step": 1, "steps": 1}
            png = client.get(job["images"][0]["url"]).content
            assert parse_parameters(PIL.Image.open(io.BytesIO(png)).info["parameters"])["steps"] == 1


def test_layout_requests_are_sampled_with_layout_and_a_gan_refuses_them(pipe):
    prompt = "a red circle left of a blue square"
    expected = pipe(prompt, num_inference_steps=STEPS, guidance_scale=5.0, seed=9, layout=True).images[0]
    with client_for(pipe, watermark=False) as client:
        job = wait_done(client, client.post("/v1/generate", json={"prompt": prompt, "seed": 9, "layout": True,
                                                                  "n": 1}).json()["id"])
        assert job["state"] == "succeeded", job
        png = client.get(job["images"][0]["url"]).content
        assert parse_parameters(PIL.Image.open(io.BytesIO(png)).info["parameters"])["layout"] == "on"
        assert job["request"]["layout"] is True and client.get("/v1/info").json()["layout"] is True
        assert np.abs(pixels(png) - np.asarray(expected).astype(int)).max() <= 1
        assert client.post("/v1/generate", json={"prompt": prompt, "layout": "yes"}).status_code == 422
    gan = BrushworkPipeline.from_pretrained("shapes-gan", device="cpu", dtype=torch.float32)
    with client_for(gan) as client:
        assert client.get("/v1/info").json()["layout"] is False   # the page hides its layout box
        response = client.post("/v1/generate", json={"prompt": prompt, "layout": True})
        assert response.status_code == 400 and response.json()["error"]["param"] == "layout"
