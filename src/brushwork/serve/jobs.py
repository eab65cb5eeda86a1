"""The job queue: a bounded FIFO, one worker thread that samples compatible jobs together in one pipeline
call (one UNet batch), previews, cancellation, timeouts and a clean shutdown. The same thread renders the
frames of live connections (/v1/live): each holds at most one waiting frame (the latest wins), and turns are
fair: every live connection with a frame renders one (frames of the same steps and guidance in one pipeline
call, up to max_batch), then one batch of queued jobs runs.

Threads: the pipeline runs only in the worker thread; HTTP handlers run in the event loop. Job state
changes under the scheduler's lock; event-loop code waits for changes with `await job.wait_change(...)`.
"""

import asyncio
import contextlib
import io
import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import PIL.Image
import PIL.PngImagePlugin
import torch

from brushwork import pnginfo, watermark
from brushwork.errors import BrushworkError
from brushwork.generation.base import Text2ImagePipeline
from brushwork.generation.output import GenerationCancelled, GenerationOutput
from brushwork.serve.metrics import Metrics

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

log = logging.getLogger("brushwork.serve")

STOP_CHECK_SECONDS = 0.05  # how often a running batch looks, inside a step, whether it should stop


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass(frozen=True)
class JobRequest:
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    n: int
    sampler: str
    width: int
    height: int
    layout: bool = False
    best_of: int = 1

    @property
    def total_steps(self) -> int:
        """Steps the job's progress counts: those of every candidate when each image is the best of several."""
        return self.steps * self.best_of

    def batch_key(self) -> tuple:
        """Jobs with equal keys share one UNet batch: a pipeline call takes one step count, sampler, size,
        guidance scale, layout setting and best_of, and a prompt, negative prompt and seed per image."""
        return (self.steps, self.sampler, self.width, self.height, self.guidance, self.layout, self.best_of)


@dataclass(frozen=True)
class JobImage:
    png: bytes  # PNG with the A1111 `parameters` chunk (and the watermark unless turned off)
    seed: int
    parameters: str


@dataclass(frozen=True)
class LiveFrame:
    """What one live message asks for, checked and filled in."""
    prompt: str
    seed: int
    steps: int
    guidance: float
    received: float  # time.monotonic() when the message arrived


@dataclass(frozen=True)
class LiveResult:
    frame: LiveFrame
    png: bytes | None = None
    error: str | None = None


class LiveSession:
    """One live connection: the frame waiting to render and the callback that takes finished ones (called in the
    worker thread)."""

    def __init__(self, deliver: Callable[[LiveResult], None]):
        self.deliver = deliver
        self.pending: LiveFrame | None = None
        self.closed = False
        self.rendered = 0
        self.dropped = 0  # frames replaced by a later message before they started


class Job:
    def __init__(self, request: JobRequest, api: str, timeout: float, owner: str = ""):
        self.id = secrets.token_urlsafe(16)  # 128 random bits: nobody finds another's job by guessing
        self.request = request
        self.api = api  # "native", "openai" or "a1111": which API submitted it
        self.owner = owner  # who may see and cancel it (serve.common.key_owner); "" on a server without keys
        self.created = time.time()
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout
        self.state = QUEUED
        self.step = 0
        self.started: float | None = None
        self.finished: float | None = None
        self.error: str | None = None
        self.error_status = 200  # the HTTP status a waiting client gets when the job did not succeed
        self.images: list[JobImage] = []
        self.preview: bytes | None = None
        self.preview_step = 0
        self.latents: torch.Tensor | None = None  # its images' latents after the last step (while it runs)
        self.version = 0  # bumped on every change
        self._listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._listeners_lock = threading.Lock()

    def notify(self) -> None:
        self.version += 1
        with self._listeners_lock:
            listeners = list(self._listeners)
        for loop, event in listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop has closed
                pass

    async def wait_change(self, seen_version: int, timeout: float) -> None:
        """Return when the job changed after `seen_version`, or after `timeout` seconds."""
        listener = (asyncio.get_running_loop(), asyncio.Event())
        with self._listeners_lock:
            self._listeners.add(listener)
        try:
            if self.version == seen_version:
                await asyncio.wait_for(listener[1].wait(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            pass
        finally:
            with self._listeners_lock:
                self._listeners.discard(listener)


def png_bytes(image: PIL.Image.Image, parameters: str) -> bytes:
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(pnginfo.CHUNK, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def compiled_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a compiled pipeline is compiled for: powers of two below max_batch, and max_batch."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return sizes + [max_batch]


def padded_batch_size(images: int, sizes: list[int]) -> int:
    """The smallest of `sizes` that holds `images`; `images` itself when none does (a job above max_batch)."""
    return min((size for size in sizes if size >= images), default=images)


def warm_up(pipe: Text2ImagePipeline, sizes: list[int], guidance: float) -> None:
    """Run a compiled pipeline once at each batch size, so that no request waits for a compile. Requests with
    guidance 1 or less (no unconditional half) or another image size compile on first use."""
    for size in sizes:
        pipe([""] * size, num_inference_steps=1, guidance_scale=guidance, seed=0)


@contextlib.contextmanager
def stop_inside_modules(should_stop: Callable[[], bool]):
    """Raise GenerationCancelled from the next torch module call of this thread once should_stop() says so
    (asked at most every STOP_CHECK_SECONDS). Step callbacks come too late for a large image: one step of a
    1024 px image on a 64 px model takes half a minute on a CPU."""
    thread, next_check = threading.get_ident(), 0.0

    def before_forward(module, args) -> None:
        nonlocal next_check
        if threading.get_ident() != thread:  # the hook is global: other threads' modules pass
            return
        now = time.monotonic()
        if now >= next_check:
            next_check = now + STOP_CHECK_SECONDS
            if should_stop():
                raise GenerationCancelled("stopped inside a step")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(before_forward)
    try:
        yield
    finally:
        handle.remove()


class JobScheduler:
    def __init__(self, pipe: Text2ImagePipeline, metrics: Metrics, max_queue: int = 32, max_batch: int = 8,
                 timeout: float = 300.0, preview_every: int = 5, watermark: bool = True, keep_finished: int = 128,
                 max_live: int = 16):
        self.pipe = pipe
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch  # images per pipeline call; one larger job still runs, alone
        # A compiled pipeline runs code compiled for one batch size: batches are filled up to one of a few
        # sizes with copies that are thrown away, instead of compiling for every size (minutes each).
        self.batch_sizes = compiled_batch_sizes(max_batch) if pipe.compiled else None
        self.timeout = timeout
        self.preview_every = preview_every
        self.watermark = watermark
        self.keep_finished = keep_finished
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._finished: deque[Job] = deque()
        self._stopping = False
        self._stop_deadline = math.inf
        self._batch_seconds = 1.0  # moving average, for Retry-After
        self._thread: threading.Thread | None = None
        self.max_live = max_live
        self._live: set[LiveSession] = set()
        self._live_ready: deque[LiveSession] = deque()  # connections with a frame, in arrival order
        self._live_round: deque[LiveSession] = deque()  # the ones whose turn it is now
        self._batch_turn = False  # a round of live frames ran: queued jobs go next
        metrics.queue_depth.set_function(lambda: len(self._queue))
        metrics.running_jobs.set_function(lambda: len(self._running))

    # ---- used by the HTTP handlers --------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="brushwork-generate", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: JobRequest, api: str, owner: str = "") -> Job:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            job = Job(request, api, self.timeout, owner)
            self._queue.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()
        return job

    def get(self, job_id: str, owner: str = "") -> Job | None:
        """The job, if it exists and belongs to `owner`."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to run; None when it is not queued."""
        with self._cond:
            return self._queue.index(job) + 1 if job in self._queue else None

    def queued_count(self) -> int:
        return len(self._queue)

    def running(self) -> list[Job]:
        """The jobs of the batch the generation thread works on, cancelled ones included until it stops."""
        return list(self._running)

    def retry_after(self) -> int:
        batches_ahead = len(self._queue) / self.max_batch + 1
        return max(1, math.ceil(self._batch_seconds * batches_ahead))

    def cancel(self, job: Job, reason: str = "cancelled by the client") -> bool:
        """Cancel a queued or running job; its place is free at once. False if it had already finished.
        A running batch stops within STOP_CHECK_SECONDS of its last job being cancelled, inside a step too."""
        with self._cond:
            if job.state in FINAL:
                return False
            if job.state == QUEUED:
                self._queue.remove(job)
            self._finish(job, CANCELLED, reason, status=409)
            return True

    def interrupt(self, api: str, owner: str = "") -> int:
        """Cancel `owner`'s running jobs submitted through `api` (AUTOMATIC1111's /interrupt); how many. As in
        AUTOMATIC1111, each keeps the images its latents decode to at the step it reached. Decoding happens in the
        calling thread, while the batch runs on: call it off the event loop."""
        stopped = 0
        for job in [job for job in self.running() if job.api == api and job.owner == owner and job.state == RUNNING]:
            partial = self._partial_images(job)
            with self._cond:
                if job.state == RUNNING:
                    job.images = partial
                    self._finish(job, CANCELLED, "interrupted", status=409)
                    stopped += 1
        return stopped

    def open_live(self, deliver: Callable[[LiveResult], None]) -> LiveSession:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._live) >= self.max_live:
                raise QueueFull(1)
            session = LiveSession(deliver)
            self._live.add(session)
            return session

    def offer(self, session: LiveSession, frame: LiveFrame) -> None:
        """Make `frame` the session's next frame; a frame still waiting is dropped, never rendered."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if session.closed:
                return
            if session.pending is not None:
                session.dropped += 1
                self.metrics.live_frames.labels("dropped").inc()
            session.pending = frame
            if session not in self._live_ready and session not in self._live_round:
                self._live_ready.append(session)
            self._cond.notify_all()

    def close_live(self, session: LiveSession) -> None:
        """Free what a closed connection held: its waiting frame now, its rendering frame at the next step."""
        with self._cond:
            session.closed = True
            if session.pending is not None:
                session.pending = None
                self.metrics.live_frames.labels("dropped").inc()
            self._live.discard(session)
            for turns in (self._live_ready, self._live_round):
                if session in turns:
                    turns.remove(session)

    def live_count(self) -> int:
        return len(self._live)

    def begin_shutdown(self, grace: float) -> None:
        """Take no new jobs, cancel the queued ones, give the running batch `grace` seconds to finish."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._stop_deadline = time.monotonic() + grace
            for job in list(self._queue):
                self._queue.remove(job)
                self._finish(job, CANCELLED, "the server is shutting down", status=503)
            for session in list(self._live):
                session.pending = None
            self._live_ready.clear()
            self._live_round.clear()
            self._cond.notify_all()

    def shutdown(self, grace: float) -> None:
        self.begin_shutdown(grace)
        if self._thread is not None:
            self._thread.join(grace + 30)
            if self._thread.is_alive():
                log.warning("the generation thread did not stop within %.0f s", grace + 30)

    # ---- worker thread ---------------------------------------------------------------------------

    def _finish(self, job: Job, state: str, error: str | None = None, status: int = 200,
                kind: str | None = None) -> None:
        """Move a job to a final state. Call with the lock held."""
        job.state, job.error, job.error_status, job.finished = state, error, status, time.time()
        job.preview = job.latents = None
        self.metrics.jobs.labels(state).inc()
        self.metrics.job_latency.labels(job.api, state).observe(time.monotonic() - job.submitted)
        if kind:
            self.metrics.errors.labels(kind).inc()
        self._finished.append(job)
        while len(self._finished) > self.keep_finished:
            self._jobs.pop(self._finished.popleft().id, None)
        job.notify()
        self._cond.notify_all()

    def _expire_queued(self) -> None:
        now = time.monotonic()
        for job in [job for job in self._queue if now > job.deadline]:
            self._queue.remove(job)
            self._finish(job, FAILED, f"timed out after {self.timeout:g} s waiting in the queue", status=504,
                         kind="timeout")

    def _take_batch(self) -> list[Job]:
        """The oldest job and the later ones that can share its UNet batch, up to max_batch images."""
        key = self._queue[0].request.batch_key()
        batch, images = [], 0
        for job in self._queue:
            if job.request.batch_key() == key and (not batch or images + job.request.n <= self.max_batch):
                batch.append(job)
                images += job.request.n
        for job in batch:
            self._queue.remove(job)
        return batch

    def _next_live(self) -> list[tuple[LiveSession, LiveFrame]]:
        """The live frames whose turn it is, as one batch: the round's next waiting frame and the round's other
        frames with the same steps and guidance, up to max_batch (a stream batch: several connections share one
        pipeline call). Empty when queued jobs go next. Call with the lock held."""
        if not self._live_round and self._live_ready and not (self._queue and self._batch_turn):
            self._live_round, self._live_ready = self._live_ready, deque()
            self._batch_turn = True
        batch = []
        for session in list(self._live_round):
            frame = session.pending
            if frame is None:
                self._live_round.remove(session)
                continue
            if batch and (frame.steps, frame.guidance) != (batch[0][1].steps, batch[0][1].guidance):
                continue
            self._live_round.remove(session)
            session.pending = None
            batch.append((session, frame))
            if len(batch) == self.max_batch:
                break
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    self._expire_queued()
                    if self._queue or self._live_ready or self._live_round:
                        break
                    if self._stopping:
                        return
                    self._cond.wait(timeout=0.5)
                live = self._next_live()
                if not live:
                    if not self._queue:
                        continue
                    self._batch_turn = False
                    batch = self._take_batch()
                    now = time.time()
                    for job in batch:
                        job.state, job.started = RUNNING, now
                        self.metrics.queue_wait.observe(time.monotonic() - job.submitted)
                        job.notify()
                    self._running = batch
            if live:
                self._render_live(live)
                continue
            started = time.monotonic()
            try:
                with stop_inside_modules(lambda: self._should_stop(batch)):
                    self._run(batch)
            except GenerationCancelled:
                self._fail_running(batch, CANCELLED, "the server shut down before the job finished", 503, None)
            except BrushworkError as error:
                self._fail_running(batch, FAILED, str(error), 400, "generation")
            except Exception as error:  # keep serving; the job says what went wrong
                log.exception("generation failed")
                self._fail_running(batch, FAILED, f"internal error: {type(error).__name__}: {error}", 500,
                                   "internal")
            finally:
                with self._cond:
                    self._running = []
                    self._batch_seconds = 0.7 * self._batch_seconds + 0.3 * (time.monotonic() - started)

    def _should_stop(self, batch: list[Job]) -> bool:
        """Fail the batch's jobs past their deadline; whether none is left running or shutdown's grace is over."""
        with self._cond:
            self._expire_queued()
            now = time.monotonic()
            for job in batch:
                if job.state == RUNNING and now > job.deadline:
                    self._finish(job, FAILED, f"timed out after {self.timeout:g} s", status=504, kind="timeout")
            return now > self._stop_deadline or not any(job.state == RUNNING for job in batch)

    def _fail_running(self, batch: list[Job], state: str, error: str, status: int, kind: str | None) -> None:
        with self._cond:
            for job in batch:
                if job.state == RUNNING:
                    self._finish(job, state, error, status, kind)

    def _run(self, batch: list[Job]) -> None:
        prompts, negatives, seeds, owners = [], [], [], []
        for job in batch:
            for k in range(job.request.n):
                prompts.append(job.request.prompt)
                negatives.append(job.request.negative_prompt)
                seeds.append(job.request.seed + k)
                owners.append(job)
        first = batch[0].request
        self.metrics.batch_images.observe(len(prompts))
        if self.batch_sizes is not None:
            fill = padded_batch_size(len(prompts), self.batch_sizes) - len(prompts)
            prompts, negatives = prompts + prompts[-1:] * fill, negatives + negatives[-1:] * fill
            seeds = seeds + seeds[-1:] * fill
        output = self.pipe(prompts, negative_prompt=negatives, num_inference_steps=first.steps,
                           guidance_scale=first.guidance, seed=seeds, height=first.height,
                           width=first.width, sampler=first.sampler, layout=first.layout, best_of=first.best_of,
                           callback_on_step_end=self._step_callback(batch, owners, first.total_steps))
        results: dict[str, list[JobImage]] = {job.id: [] for job in batch}
        for i, job in enumerate(owners):
            if job.state != RUNNING:
                continue
            text = pnginfo.format_parameters(**output.parameters(i))  # with the kept candidate's seed
            results[job.id].append(JobImage(self._encode(output.images[i], text), output.seeds[i], text))
        with self._cond:
            for job in batch:
                if job.state == RUNNING:
                    job.images = results[job.id]
                    job.step = first.total_steps
                    self.metrics.images.inc(len(job.images))
                    self._finish(job, SUCCEEDED)

    def _render_live(self, batch: list[tuple[LiveSession, LiveFrame]]) -> None:
        sessions, frames = [session for session, _ in batch], [frame for _, frame in batch]

        def on_step(pipe, index: int, timestep, tensors: dict) -> dict:
            stop = all(session.closed for session in sessions) or time.monotonic() > self._stop_deadline
            return {"cancel": True} if stop else {}

        prompts, seeds = [frame.prompt for frame in frames], [frame.seed for frame in frames]
        if self.batch_sizes is not None:
            fill = padded_batch_size(len(prompts), self.batch_sizes) - len(prompts)
            prompts, seeds = prompts + prompts[-1:] * fill, seeds + seeds[-1:] * fill

        def deliver(session: LiveSession, result: LiveResult) -> None:
            if not session.closed:
                session.rendered += result.png is not None
                session.deliver(result)

        try:
            output = self.pipe(prompts, num_inference_steps=frames[0].steps, guidance_scale=frames[0].guidance,
                               seed=seeds, callback_on_step_end=on_step)
        except GenerationCancelled:
            self.metrics.live_frames.labels("cancelled").inc(len(frames))
            return
        except BrushworkError as error:
            failure = str(error)
        except Exception as error:  # keep serving; the connections hear what went wrong
            log.exception("live frame failed")
            failure = f"internal error: {type(error).__name__}: {error}"
        else:
            self.metrics.live_frames.labels("rendered").inc(len(frames))
            for i, (session, frame) in enumerate(batch):   # each frame leaves as soon as it is encoded
                if not session.closed:
                    text = pnginfo.format_parameters(**output.parameters(i))
                    deliver(session, LiveResult(frame, png=self._encode(output.images[i], text)))
            return
        self.metrics.live_frames.labels("failed").inc(len(frames))
        for session, frame in batch:
            deliver(session, LiveResult(frame, error=failure))

    def _encode(self, image: PIL.Image.Image, parameters: str) -> bytes:
        return png_bytes(watermark.embed(image) if self.watermark else image, parameters)

    def _step_callback(self, batch: list[Job], owners: list[Job], steps: int) -> Callable:
        first_image = {job.id: owners.index(job) for job in batch}

        def on_step(pipe, index: int, timestep, tensors: dict) -> dict:
            step = index + 1
            if self._should_stop(batch):
                return {"cancel": True}
            live = [job for job in batch if job.state == RUNNING]
            previews: list[bytes | None] = [None] * len(live)
            if self.preview_every and step % self.preview_every == 0 and step < steps:
                previews = self._previews(tensors["latents"], [first_image[job.id] for job in live])
            with self._cond:
                for job, preview in zip(live, previews):
                    if job.state != RUNNING:
                        continue
                    first = first_image[job.id]
                    job.latents = tensors["latents"][first:first + job.request.n].detach().clone()
                    job.step = step
                    if preview is not None:
                        job.preview, job.preview_step = preview, step
                    job.notify()
            return {}

        return on_step

    def _partial_images(self, job: Job) -> list[JobImage]:
        """The job's images as its latents stand now (none before its first step, or from a one-step GAN)."""
        latents, r = job.latents, job.request
        if latents is None:
            return []
        output = GenerationOutput(self.pipe.preview_images(latents), [r.prompt] * r.n, [r.negative_prompt] * r.n,
                                  [r.seed + k for k in range(r.n)], r.steps, r.guidance, r.sampler, r.height, r.width,
                                  self.pipe.name, self.pipe.model_hash)
        texts = [pnginfo.format_parameters(**output.parameters(k)) for k in range(r.n)]
        return [JobImage(self._encode(image, text), seed, text)
                for image, seed, text in zip(output.images, output.seeds, texts)]

    def _previews(self, latents: torch.Tensor, indices: list[int]) -> list[bytes]:
        """PNGs of the images the latents would decode to now (the first image of each job)."""
        return [self._encode(image, "preview") for image in self.pipe.preview_images(latents[indices])]
