"""Shared by the test_serve*.py files: a tiny pipeline, a pipeline wrapper that can be held at a step, and a
real uvicorn server on a free loopback port."""

import socket
import threading
import time
from contextlib import contextmanager

from brushwork.commands.serve import make_server


class GatedPipe:
    """Wraps a BrushworkPipeline: records each call's batch size, waits `delay` seconds per step, and holds
    the first step of every call while `gate` is clear (set by default)."""

    def __init__(self, pipe, delay: float = 0.0):
        self.pipe = pipe
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a call reached its first step
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, callback_on_step_end=None, **kwargs):
        self.calls.append(len(prompts))

        def on_step(pipe, index, timestep, tensors):
            self.entered.set()
            self.gate.wait(30)
            time.sleep(self.delay)
            return callback_on_step_end(pipe, index, timestep, tensors)

        return self.pipe(prompts, callback_on_step_end=on_step, **kwargs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(app, shutdown_grace: float = 5.0):
    """Run the app under uvicorn on 127.0.0.1 in a thread; yields (base URL, server)."""
    port = free_port()
    server = make_server(app, "127.0.0.1", port, shutdown_grace, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class SlowStepPipe:
    """Wraps a BrushworkPipeline: each call first waits for `gate` (set by default), then spends `seconds` in
    torch module calls without a step callback (one long step, like a 1024 px image on a 64 px model), then
    makes the real call."""

    def __init__(self, pipe, seconds: float):
        self.pipe = pipe
        self.seconds = seconds
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, **kwargs):
        import torch

        self.entered.set()
        self.gate.wait(30)
        layer, end = torch.nn.Identity(), time.monotonic() + self.seconds
        while time.monotonic() < end:
            layer(torch.zeros(1))
            time.sleep(0.01)
        return self.pipe(prompts, **kwargs)
