"""What every route uses: the server's settings and state, errors in one JSON shape, the API key check,
the prompt blocklist, submitting a job and waiting for it."""

import base64
import binascii
import hashlib
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
from brushwork.serve.schemas import MAX_SEED, MAX_SIDE, LiveRequest

# The default cost limit, in image-steps at the model's own size: 8 images of 150 steps.
DEFAULT_COST_IMAGE_STEPS = 1200


# Letters of other scripts that look like Latin ones, as a blocklist bypass uses them ("сircle" with a
# Cyrillic с). Capitals are folded before case folding, where Greek Ν (N) and ν (v) still differ.
_CAPITAL_LOOKALIKES = str.maketrans("АВЕКМНОРСТХУІЈЅΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEKMHOPCTXYIJSABEZHIKMNOPTYX")
_SMALL_LOOKALIKES = str.maketrans("аеорсухіјѕһԁԛԝӏοαικνρτυχ", "aeopcyxijshdqwloaikvptux")


class Blocklist:
    """Terms (one per line, `#` comments) that a prompt may not contain, matched as whole words after
    Unicode normalisation (NFKC), removal of invisible format characters (zero-width space, soft hyphen),
    folding of Cyrillic and Greek look-alike letters, and case folding."""

    def __init__(self, terms: list[str], source: str = "blocklist"):
        self.terms = [t for t in (self._normalise(t) for t in terms) if t]
        self.source = source
        self._patterns = [re.compile(rf"(?<!\w){re.escape(term)}(?!\w)") for term in self.terms]

    @staticmethod
    def _normalise(text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        text = "".join(char for char in text if unicodedata.category(char) != "Cf")
        text = text.translate(_CAPITAL_LOOKALIKES).casefold().translate(_SMALL_LOOKALIKES)
        return " ".join(text.split())

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
    # Keys a client may send (Authorization: Bearer KEY); none: no key needed. A job belongs to the key that
    # submitted it: another key cannot see, follow or cancel it.
    api_keys: tuple[str, ...] = ()
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
    # Work one request may ask for, in pixel-steps (width x height x steps x images x best_of); more gets 400.
    # None: DEFAULT_COST_IMAGE_STEPS image-steps at the model's own size.
    max_cost: int | None = None
    max_side: int | None = None  # largest width or height; None: twice the model's own size
    max_body: int = 1_000_000  # bytes of a request body; more gets 413 before it is read
    # Host header names answered (no port; IPv6 in brackets); others get 400, which stops DNS rebinding of a
    # loopback server. None: any.
    allowed_hosts: tuple[str, ...] | None = None
    public_url: str | None = None  # base of the URLs in responses; None: the one the request came to
    max_live: int = 16  # open /v1/live connections; more are refused


class ApiError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}} (OpenAI's shape)."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 kind: str | None = "request", headers: dict[str, str] | None = None, code: str | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.kind = kind  # label of brushwork_errors in /metrics; None: already counted
        self.headers = headers
        self.extra = extra or {}  # more fields of the error object (the cost limit's `limit` and `cost`)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


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
        native = pipe.default_size
        self.max_side = config.max_side or min(2 * native, MAX_SIDE)
        self.max_cost = config.max_cost or native * native * DEFAULT_COST_IMAGE_STEPS
        default_cost = native * native * self.default_steps
        if native > self.max_side or default_cost > self.max_cost:
            raise BrushworkError(f"--max-size {self.max_side} and --max-cost {self.max_cost:,} refuse "
                                 f"{pipe.name}'s own request ({native}x{native} px, {self.default_steps} steps: "
                                 f"{default_cost:,} pixel-steps); raise them")

    @property
    def default_steps(self) -> int:
        """The steps a request that names none takes (a one-step GAN takes one whatever a request asks)."""
        return self.pipe.resolve_steps(None, self.config.default_steps)

    def job_request(self, prompt: str, negative_prompt: str = "", steps: int | None = None,
                    guidance: float | None = None, seed: int | None = None, n: int = 1, sampler: str | None = None,
                    width: int | None = None, height: int | None = None, layout: bool = False,
                    best_of: int = 1, size_param: str | None = None) -> JobRequest:
        """A complete job from checked request fields: defaults filled in, the prompt filtered, the size and cost
        within this server's limits. size_param: the request field that set width and height, when not those."""
        self.check_prompt(prompt)
        self.check_prompt(negative_prompt, "negative_prompt")
        if layout and not self.pipe.supports_layout:
            raise ApiError(400, f"layout guidance steers classifier-free guidance; {self.pipe.name} has none (a "
                                "one-step GAN, or a few-step model, whose UNet takes the guidance)",
                           param="layout", type="invalid_request_error", kind="validation")
        if best_of > 1:
            try:
                self.pipe.ranker  # noqa: B018 -- loads the CLIP that ranks the candidates, or says there is none
            except BrushworkError as error:
                raise ApiError(400, str(error), param="best_of", type="invalid_request_error",
                               kind="validation") from None
        request = JobRequest(
            prompt=prompt, negative_prompt=negative_prompt,
            steps=self.pipe.resolve_steps(steps, self.config.default_steps),
            guidance=guidance if guidance is not None else self.config.default_guidance,
            seed=secrets.randbelow(MAX_SEED + 1) if seed in (None, -1) else seed, n=n,
            sampler=resolve_sampler(sampler, self.pipe.default_sampler),
            width=width or self.pipe.default_size, height=height or self.pipe.default_size, layout=layout,
            best_of=best_of)
        try:
            self.pipe.check_model_inputs(request.sampler, [negative_prompt], request.steps)
        except BrushworkError as error:
            raise ApiError(400, str(error), type="invalid_request_error", kind="validation") from None
        self.check_limits(request, size_param)
        return request

    def check_limits(self, request: JobRequest, size_param: str | None = None) -> None:
        """400 for a side above max_side or a request costing more than max_cost, before it is queued: one
        such request would hold the only generation thread for minutes."""
        native = self.pipe.default_size
        for name, side in (("width", request.width), ("height", request.height)):
            if side > self.max_side:
                raise ApiError(400, f"{name} {side} is above this server's largest side, {self.max_side} px (this "
                                    f"model makes {native}x{native} images; serve --max-size allows more)",
                               param=size_param or name, kind="too_costly", code="size_limit",
                               extra={"limit": self.max_side, "value": side})
        cost = request.width * request.height * request.total_steps * request.n
        if cost > self.max_cost:
            raise ApiError(400, f"this request costs {cost:,} pixel-steps ({request.width}x{request.height} px x "
                                f"{request.steps} steps x {request.n} images x best_of {request.best_of}); this "
                                f"server allows {self.max_cost:,} a request (serve --max-cost): ask for fewer "
                                "steps, images or pixels", kind="too_costly", code="cost_limit",
                           extra={"limit": self.max_cost, "cost": cost})

    def check_model(self, model: str | None, aliases: tuple[str, ...] = ()) -> None:
        """400 unless `model` is None, this server's model or one of `aliases` (names taken to mean it)."""
        if model is not None and model != self.pipe.name and model not in aliases:
            raise ApiError(400, f"this server runs the model '{self.pipe.name}'; it cannot render with '{model}'",
                           param="model", kind="validation", code="model_not_found")

    def check_prompt(self, text: str, field: str = "prompt") -> None:
        blocklist = self.config.blocklist
        term = blocklist.match(text) if blocklist else None
        if term is not None:
            raise ApiError(400, f"{field} rejected: it contains '{term}', which this server's blocklist does not "
                                "allow", param=field, type="prompt_blocked", kind="blocked")

    def live_frame(self, message: LiveRequest, received: float) -> LiveFrame:
        """A live message checked and filled in: the model's own steps unless it names others (a few-step model's
        few, a GAN's one). Fewer steps than the default of a model that is not a few-step one are refused: its
        images would degrade."""
        self.check_prompt(message.prompt)
        self.check_model(message.model)
        steps = self.pipe.resolve_steps(message.steps, self.default_steps)
        if steps < self.default_steps and not self.pipe.few_step:
            raise ApiError(400, f"{self.pipe.name} is not a few-step model: below its {self.default_steps} steps its "
                                f"images degrade, so {steps} is refused; ask for {self.default_steps} or more, or "
                                "serve a few-step model (brushwork train distill)", param="steps", kind="validation")
        return LiveFrame(message.prompt, message.seed, steps, self.config.default_guidance, received)

    def submit(self, request: JobRequest, api: str, owner: str) -> Job:
        try:
            return self.scheduler.submit(request, api, owner)
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


def key_owner(given: str, keys: tuple[str, ...]) -> str | None:
    """Who sends the key `given`: a digest of the key it matches ("" when the server has no keys), or None when
    it matches none."""
    if not keys:
        return ""
    match = next((key for key in keys if key_matches(given, key)), None)
    return None if match is None else hashlib.sha256(match.encode()).hexdigest()[:16]


def require_api_key(request: Request) -> None:
    """Checks the Authorization header when the server has keys, and notes who sent it (`owner`)."""
    owner = key_owner(key_from_header(request.headers.get("authorization", "")), service(request).config.api_keys)
    request.state.owner = owner
    if owner is None:
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                       type="authentication_error", kind="auth", headers={"WWW-Authenticate": "Bearer"})


def owner(request: Request) -> str:
    """Who sent the request (see key_owner): a route's jobs belong to it."""
    return request.state.owner


def b64_png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
