"""brushwork serve under a real uvicorn on 127.0.0.1: the official openai client, the webuiapi
(AUTOMATIC1111) client, disconnects, a small load run, SIGTERM handling and connection limits."""

import base64
import io
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import PIL.Image
import pytest
import torch
import webuiapi
from sd_tiny import build_tiny_sd
from serve_helpers import GatedPipe, live_server, wait_until

from brushwork.generation.auto import BrushworkPipeline
from brushwork.pnginfo import parse_parameters
from brushwork.serve.app import create_app
from brushwork.serve.common import ServeConfig
from brushwork.serve.connections import HeaderDeadline
from brushwork.watermark import detect


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_tiny_sd(tmp_path_factory.mktemp("serve-clients") / "tiny")
    return BrushworkPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def app_for(pipe, **settings):
    return create_app(pipe, ServeConfig(**{"default_steps": 3, "preview_every": 1, **settings}))


@pytest.fixture(scope="module")
def server(pipe):
    with live_server(app_for(pipe)) as (url, uvicorn_server):
        yield url


def test_openai_client(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed-on-loopback", max_retries=0)
    assert [model.id for model in client.models.list()] == ["tiny"]
    result = client.images.generate(prompt="a red circle", n=2, size="32x32", response_format="b64_json",
                                    model="tiny", extra_body={"seed": 21, "steps": 2})
    assert len(result.data) == 2
    for k, item in enumerate(result.data):
        image = PIL.Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (32, 32) and detect(image).found
        assert parse_parameters(image.info["parameters"])["seed"] == 21 + k

    by_url = client.images.generate(prompt="a", size="32x32", response_format="url")
    assert httpx.get(by_url.data[0].url).headers["content-type"] == "image/png"

    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.images.generate(prompt="a", n=1000)
    assert "n:" in str(error.value)


def test_webuiapi_client(server):
    port = int(server.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=5, width=32, height=32,
                         batch_size=2, n_iter=1, cfg_scale=4)
    assert len(result.images) == 2 and result.images[0].size == (32, 32)
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "Euler a"
    params = parse_parameters(result.info["infotexts"][1])
    assert (params["seed"], params["negative_prompt"], params["cfg_scale"]) == (6, "blue", 4.0)
    assert result.parameters["prompt"] == "a red circle"
    assert api.util_get_model_names()[0].startswith("tiny [")
    assert "Euler a" in api.util_get_sampler_names()
    progress = api.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0


def test_a1111_progress_and_interrupt(pipe):
    gated = GatedPipe(pipe, delay=0.05)
    with live_server(app_for(gated)) as (url, _):
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler", steps=100)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(api.txt2img, prompt="a", width=32, height=32)
            wait_until(lambda: api.get_progress()["state"]["sampling_step"] >= 2)
            progress = api.get_progress()
            assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 100
            assert PIL.Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (32, 32)
            assert api.interrupt() == {}
            result = pending.result(timeout=30)
        # as AUTOMATIC1111 does: the images as far as they got, with their parameters
        assert [image.size for image in result.images] == [(32, 32)] and result.info["interrupted"] is True
        assert parse_parameters(result.info["infotexts"][0])["steps"] == 100
        assert "parameters" in result.images[0].info


def test_client_disconnect_frees_its_place(pipe):
    gated = GatedPipe(pipe)
    gated.gate.clear()
    app = app_for(gated)
    scheduler = app.state.service.scheduler
    with live_server(app) as (url, _):
        body = {"prompt": "a", "size": "32x32"}
        for _ in range(2):  # the first runs (held at its first step), the second waits in the queue
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/images/generations", json={**body, "steps": 3 + _}, timeout=1.0)
        wait_until(lambda: scheduler.queued_count() == 0)
        jobs = [scheduler.get(job_id) for job_id in list(scheduler._jobs)]
        assert [job.state for job in jobs] == ["cancelled", "cancelled"]
        assert all(job.error == "the client disconnected" for job in jobs)
        gated.gate.set()
        wait_until(lambda: not scheduler.running())
        assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=30).status_code == 200


def test_load_answers_only_200_or_429(pipe):
    with live_server(app_for(pipe, max_queue=4, default_steps=2)) as (url, _):
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16)) as client:
            def one(i: int) -> httpx.Response:
                return client.post(f"{url}/sdapi/v1/txt2img", json={"prompt": f"p{i}", "steps": 2, "seed": i})

            with ThreadPoolExecutor(16) as pool:
                responses = list(pool.map(one, range(48)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(200) >= 4
        assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
        assert httpx.get(f"{url}/health").status_code == 200


def test_sigterm_answers_waiting_clients_and_stops(pipe):
    gated = GatedPipe(pipe, delay=0.05)
    with live_server(app_for(gated), shutdown_grace=10) as (url, server):
        scheduler = server.config.app.state.service.scheduler
        answers = {}

        def post(name: str, steps: int) -> None:
            body = {"prompt": name, "size": "32x32", "steps": steps}
            answers[name] = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)

        threads = [threading.Thread(target=post, args=("running", 10))]
        threads[0].start()
        wait_until(lambda: scheduler.running())
        threads.append(threading.Thread(target=post, args=("queued", 11)))
        threads[1].start()
        wait_until(lambda: scheduler.queued_count() == 1)
        server.handle_exit(signal.SIGTERM, None)
        for thread in threads:
            thread.join(30)
        assert answers["running"].status_code == 200 and len(answers["running"].json()["data"]) == 1
        assert answers["queued"].status_code == 503
        assert "shutting down" in json.loads(answers["queued"].text)["error"]["message"]
        wait_until(lambda: not scheduler.ready and not scheduler._thread.is_alive())


def test_slow_headers_are_cut_off_and_huge_headers_get_431(pipe, monkeypatch):
    monkeypatch.setattr(HeaderDeadline, "header_seconds", 1.0)
    with live_server(app_for(pipe)) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:  # slowloris: a header a while
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started, closed = time.monotonic(), False
            while time.monotonic() - started < 4 and not closed:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                    slow.settimeout(0.3)
                    closed = slow.recv(1024) == b""
                except socket.timeout:
                    pass
                except OSError:  # reset: closed too
                    closed = True
            assert closed and time.monotonic() - started < 3
        with httpx.Client() as client:  # a prompt client on a kept-alive connection is not cut off
            for _ in range(3):
                assert client.get(f"{url}/health").status_code == 200
                time.sleep(0.6)
        big = httpx.get(f"{url}/health", headers={"X-Big": "a" * 200_000})
        assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"
        assert httpx.get(f"{url}/health").status_code == 200
