"""What every route uses: the server's settings and state, errors in one JSON shape, the API key check,
the prompt blocklist, submitting a job and waiting for it."""

import base64
import binascii
import re
import secrets
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from brushwork.errors import BrushworkError
from brushwork.generation.base import Text2ImagePipeline
from brushwork.generation.samplers import resolve_sampler
from brushwork.serve.jobs import FINAL, Job, JobRequest, JobScheduler, LiveFrame, QueueFull, ShuttingDown
from brushwork.serve.metrics import Metrics
from brushwork.serve.schemas import MAX_SEED, LiveRequest


class Blocklist:
    """Terms (one per line, `#` comments) that a prompt may not contain, matched as whole words after
    Unicode normalisation and case folding."""

    def __init__(self, terms: list[str], source: str = "blocklist"):
        self.terms = [t for t in (self._normalise(t) for t in terms) if t]
        self.source = source
        self._patterns = [re.compile(rf"(?<!\w){re.escape(term)}(?!\w)") for term in self.terms]

    @staticmethod
    def _normalise(text: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", text).casefold().split())

    @classmethod
    def from_file(cls, path: Path) -> "Blocklist":
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise BrushworkError(f"blocklist file not found: {path}") from None
        except UnicodeDecodeError:
            raise BrushworkError(f"blocklist {path} is not UTF-8 text") from None
        blocklist = cls([line.strip() for line in lines if not line.strip().startswith("#")], source=str(path))
        if not blocklist.terms:
            raise BrushworkError(f"blocklist {path} holds no terms (one word or phrase per line)")
        return blocklist

    def match(self, prompt: str) -> str | None:
        """The first blocked term the prompt contains, or None."""
        text = self._normalise(prompt)
        return next((term for term, pattern in zip(self.terms, self._patterns) if pattern.search(text)), None)


@dataclass
class ServeConfig:
    api_key: str | None = None
    watermark: bool = True
    blocklist: Blocklist | None = None
    max_queue: int = 32  # jobs waiting; more get 429
    max_batch: int = 8  # images per UNet batch
    timeout: float = 300.0  # seconds from submission until a job fails
    preview_every: int = 5  # steps between preview images; 0 for none
    default_steps: int = 20
    default_guidance: float = 5.0
    shutdown_grace: float = 10.0  # seconds a running batch may take to finish at shutdown
    keep_finished: int = 128  # finished jobs kept for GET /v1/jobs/{id}
    live_steps: int = 4  # steps of a live frame that names none
    max_live: int = 16  # open /v1/live connections; more are refused


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}} (OpenAI's shape)."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 kind: str | None = "request", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.kind = kind  # label of brushwork_errors in /metrics; None: already counted
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


class Service:
    """One server's state: the pipeline, its settings, the scheduler and the metrics."""

    def __init__(self, pipe: Text2ImagePipeline, config: ServeConfig):
        self.pipe = pipe
        self.config = config
        self.metrics = Metrics()
        self.scheduler = JobScheduler(pipe, self.metrics, max_queue=config.max_queue, max_batch=config.max_batch,
                                      timeout=config.timeout, preview_every=config.preview_every,
                                      watermark=config.watermark, keep_finished=config.keep_finished,
                                      max_live=config.max_live)

    @property
    def default_steps(self) -> int:
        """The steps a request that names none takes (a one-step GAN takes one whatever a request asks)."""
        return self.pipe.resolve_steps(None, self.config.default_steps)

    def job_request(self, prompt: str, negative_prompt: str = "", steps: int | None = None,
                    guidance: float | None = None, seed: int | None = None, n: int = 1, sampler: str | None = None,
                    width: int | None = None, height: int | None = None, layout: bool = False,
                    best_of: int = 1) -> JobRequest:
        """A complete job from checked request fields: defaults filled in, the prompt filtered."""
        self.check_prompt(prompt)
        if layout and not self.pipe.supports_layout:
            raise ApiError(400, "layout guidance needs a diffusion model; this server runs a one-step GAN",
                           param="layout", type="invalid_request_error", kind="validation")
        if best_of > 1:
            try:
                self.pipe.ranker  # noqa: B018 -- loads the CLIP that ranks the candidates, or says there is none
            except BrushworkError as error:
                raise ApiError(400, str(error), param="best_of", type="invalid_request_error",
                               kind="validation") from None
        return JobRequest(
            prompt=prompt, negative_prompt=negative_prompt,
            steps=self.pipe.resolve_steps(steps, self.config.default_steps),
            guidance=guidance if guidance is not None else self.config.default_guidance,
            seed=seed if seed is not None else secrets.randbelow(MAX_SEED + 1), n=n,
            sampler=resolve_sampler(sampler),
            width=width or self.pipe.default_size, height=height or self.pipe.default_size, layout=layout,
            best_of=best_of)

    def check_prompt(self, prompt: str) -> None:
        blocklist = self.config.blocklist
        term = blocklist.match(prompt) if blocklist else None
        if term is not None:
            raise ApiError(400, f"prompt rejected: it contains '{term}', which this server's blocklist does not "
                                "allow", param="prompt", type="prompt_blocked", kind="blocked")

    def live_frame(self, message: LiveRequest, received: float) -> LiveFrame:
        """A live message checked and filled in. Fewer steps than a diffusion model's default are rendered, with
        a warning that says the model was not made for them."""
        self.check_prompt(message.prompt)
        if message.model is not None and message.model != self.pipe.name:
            raise ApiError(400, f"this server runs the model '{self.pipe.name}'; it cannot render with "
                                f"'{message.model}'", param="model", kind="validation")
        steps = self.pipe.resolve_steps(message.steps, self.config.live_steps)
        warning = None
        if steps < self.default_steps:
            warning = (f"{self.pipe.name} is not a few-step model: at {steps} steps its images are rougher than at "
                       f"its {self.default_steps}")
        return LiveFrame(message.prompt, message.seed, steps, self.config.default_guidance, received, warning)

    def submit(self, request: JobRequest, api: str) -> Job:
        try:
            return self.scheduler.submit(request, api)
        except QueueFull as error:
            raise ApiError(429, f"the queue is full ({self.config.max_queue} jobs waiting); retry in "
                                f"{error.retry_after} s", type="rate_limit_error", kind="queue_full",
                           headers={"Retry-After": str(error.retry_after)}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", type="server_error", kind="shutting_down") from None

    async def wait(self, job: Job, request: Request) -> None:
        """Wait until the job finishes; a client that disconnects first cancels it."""
        while job.state not in FINAL:
            seen = job.version
            if await request.is_disconnected():
                self.scheduler.cancel(job, "the client disconnected")
                return
            await job.wait_change(seen, timeout=0.5)


def service(request: Request) -> Service:
    return request.app.state.service


def key_from_header(authorization: str) -> str:
    """The key in `Authorization: Bearer KEY`, or HTTP Basic with the key as password (as AUTOMATIC1111 clients
    send it); "" when there is none."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2].strip()
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return value.strip() if scheme.lower() == "bearer" else ""


def key_matches(given: str, key: str) -> bool:
    return secrets.compare_digest(given.encode(), key.encode())


def require_api_key(request: Request) -> None:
    """Checks the Authorization header when the server has a key."""
    key = service(request).config.api_key
    if key is None:
        return
    if not key_matches(key_from_header(request.headers.get("authorization", "")), key):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                       type="authentication_error", kind="auth", headers={"WWW-Authenticate": "Bearer"})


def b64_png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
