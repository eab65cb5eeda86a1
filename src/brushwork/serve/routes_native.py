"""Brushwork's own API: submit a job, follow it (state, server-sent events with previews), fetch its PNGs,
cancel it."""

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from brushwork.generation.samplers import A1111_SAMPLER_NAMES, SAMPLERS
from brushwork.serve import schemas
from brushwork.serve.common import ApiError, Service, b64_png, owner, service
from brushwork.serve.jobs import FINAL, Job

router = APIRouter()

KEEPALIVE_SECONDS = 15.0


def _find(svc: Service, job_id: str, request: Request) -> Job:
    """The job, when it belongs to the caller's key; another key's job is as unknown as a wrong id."""
    job = svc.scheduler.get(job_id, owner(request))
    if job is None:
        raise ApiError(404, f"no job {job_id!r} (unknown, or finished long ago and forgotten)", param="id",
                       type="not_found")
    return job


def job_view(svc: Service, job: Job) -> dict:
    request = job.request
    return {
        "id": job.id,
        "state": job.state,
        "queue_position": svc.scheduler.queue_position(job),
        "progress": {"step": job.step, "steps": request.total_steps},
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "error": job.error,
        "request": {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
                    "guidance": request.guidance, "seed": request.seed, "n": request.n, "sampler": request.sampler,
                    "width": request.width, "height": request.height, "layout": request.layout,
                    "best_of": request.best_of},
        "images": [{"index": i, "seed": image.seed, "parameters": image.parameters,
                    "url": f"/v1/jobs/{job.id}/images/{i}.png"} for i, image in enumerate(job.images)],
    }


@router.get("/v1/info")
def info(svc: Service = Depends(service)) -> dict:
    """What the web page and clients need to know: model, defaults, limits."""
    config = svc.config
    return {
        "model": svc.pipe.name,
        "model_hash": svc.pipe.model_hash,
        "default_size": svc.pipe.default_size,
        "defaults": {"steps": svc.default_steps, "guidance": config.default_guidance,
                     "live_steps": svc.default_steps},
        "limits": {"steps": schemas.MAX_STEPS, "n": schemas.MAX_IMAGES, "side": svc.max_side, "cost": svc.max_cost,
                   "side_multiple": schemas.SIDE_MULTIPLE, "guidance": schemas.MAX_GUIDANCE,
                   "prompt_chars": schemas.MAX_PROMPT_CHARS, "seed": schemas.MAX_SEED,
                   "best_of": schemas.MAX_BEST_OF if svc.pipe.clip_folder else 1},  # 1: no CLIP to rank with
        "samplers": [{"name": name, "a1111_name": A1111_SAMPLER_NAMES[name]} for name in SAMPLERS],
        "watermark": config.watermark,
        "layout": svc.pipe.supports_layout,  # whether requests may ask for layout guidance
    }


@router.post("/v1/generate", status_code=202)
async def generate(body: schemas.GenerateRequest, request: Request, response: Response,
                   svc: Service = Depends(service)) -> dict:
    job = svc.submit(svc.job_request(**body.model_dump()), api="native", owner=owner(request))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(svc, job)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request, svc: Service = Depends(service)) -> dict:
    return job_view(svc, _find(svc, job_id, request))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request, svc: Service = Depends(service)) -> dict:
    job = _find(svc, job_id, request)
    svc.scheduler.cancel(job)
    return job_view(svc, job)


@router.get("/v1/jobs/{job_id}/images/{index}.png")
async def get_image(job_id: str, index: int, request: Request, svc: Service = Depends(service)) -> Response:
    job = _find(svc, job_id, request)
    if not 0 <= index < len(job.images):
        raise ApiError(404, f"job {job_id} has {len(job.images)} images; no image {index}", param="index",
                       type="not_found")
    return Response(job.images[index].png, media_type="image/png",
                    headers={"Content-Disposition": f'inline; filename="brushwork-{job.id}-{index}.png"'})


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, svc: Service = Depends(service)) -> StreamingResponse:
    """Server-sent events: `progress` on every change (state, step, queue position, and a preview as a
    data URL when a new one is ready), then one `done` with the whole job, and the stream ends.

    A StreamingResponse, not sse-starlette's EventSourceResponse: the stream waits on job changes and checks the
    disconnect itself, and the framing is `_event`'s one line; the package would add a dependency, not code saved."""
    job = _find(svc, job_id, request)

    async def stream():
        seen, sent_preview = -1, 0
        while True:
            version = job.version
            if version != seen:
                seen = version
                if job.state in FINAL:
                    yield _event("done", job_view(svc, job))
                    return
                update = {"state": job.state, "step": job.step, "steps": job.request.steps,
                          "queue_position": svc.scheduler.queue_position(job)}
                if job.preview is not None and job.preview_step != sent_preview:
                    sent_preview = job.preview_step
                    update["preview"] = "data:image/png;base64," + b64_png(job.preview)
                    update["preview_step"] = job.preview_step
                yield _event("progress", update)
            if await request.is_disconnected():
                return
            await job.wait_change(seen, KEEPALIVE_SECONDS)
            if job.version == seen:
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
