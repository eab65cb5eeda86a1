"""AUTOMATIC1111-compatible API (/sdapi/v1): txt2img, progress, interrupt, png-info, and the model, sampler,
scheduler, option and script listings its clients read when they connect."""

import asyncio
import json
import time

from fastapi import APIRouter, Depends, Request

from brushwork import __version__
from brushwork.errors import BrushworkError
from brushwork.generation.samplers import A1111_SAMPLER_NAMES, SAMPLERS
from brushwork.pnginfo import labelled_parameters, parameters_in_image
from brushwork.serve.common import ApiError, Service, b64_png, owner, service
from brushwork.serve.jobs import CANCELLED, RUNNING, SUCCEEDED, Job
from brushwork.serve.schemas import SCHEDULE_TYPES, A1111PngInfoRequest, A1111Txt2ImgRequest

router = APIRouter(prefix="/sdapi/v1")
API = "a1111"


def _model_title(svc: Service) -> str:
    return f"{svc.pipe.name} [{svc.pipe.model_hash}]"


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds))


def _info(svc: Service, job: Job, body: A1111Txt2ImgRequest) -> dict:
    r = job.request
    seeds = [r.seed + k for k in range(r.n)]
    return {
        "prompt": r.prompt, "all_prompts": [r.prompt] * r.n,
        "negative_prompt": r.negative_prompt, "all_negative_prompts": [r.negative_prompt] * r.n,
        "seed": r.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * r.n, "subseed_strength": 0,
        "width": r.width, "height": r.height, "sampler_name": A1111_SAMPLER_NAMES[r.sampler],
        "cfg_scale": r.guidance, "steps": r.steps, "batch_size": body.batch_size, "n_iter": body.n_iter,
        "restore_faces": False, "sd_model_name": svc.pipe.name, "sd_model_hash": svc.pipe.model_hash,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [image.parameters for image in job.images], "styles": [],
        "job_timestamp": _timestamp(job.created), "clip_skip": 1, "version": f"brushwork {__version__}",
        "interrupted": job.state == CANCELLED,
    }


@router.post("/txt2img")
async def txt2img(body: A1111Txt2ImgRequest, request: Request, svc: Service = Depends(service)) -> dict:
    """Like AUTOMATIC1111, an interrupted job answers 200 with its images as far as they got."""
    job = svc.submit(svc.job_request(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, guidance=body.cfg_scale,
        seed=body.seed, n=body.batch_size * body.n_iter, sampler=body.sampler(),
        width=body.width, height=body.height), api=API, owner=owner(request))
    await svc.wait(job, request)
    interrupted = job.state == CANCELLED and job.error_status == 409
    if job.state != SUCCEEDED and not interrupted:
        raise ApiError(job.error_status, f"txt2img {job.state}: {job.error}",
                       type="server_error" if job.error_status >= 500 else "invalid_request_error", kind=None)
    return {"images": [b64_png(image.png) for image in job.images], "parameters": body.model_dump(),
            "info": json.dumps(_info(svc, job, body))}


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False, svc: Service = Depends(service)) -> dict:
    """Progress of the running job (the caller's own first, when a batch holds several), as AUTOMATIC1111 reports
    it. While the generation thread still stops a cancelled batch it is busy, not idle: `interrupted` and
    `textinfo` say so. Job ids are never shown (an id opens its job's prompt), and the preview only to its owner."""
    busy = svc.scheduler.running()
    running = sorted((job for job in busy if job.state == RUNNING), key=lambda job: job.owner != owner(request))
    queued = svc.scheduler.queued_count()
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(busy) + queued,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    idle = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
            "textinfo": f"{queued} jobs waiting" if queued else None}
    if not running:
        if busy:
            state.update(job="stopping", interrupted=True, job_timestamp=_timestamp(busy[0].created))
            idle["textinfo"] = f"stopping a {busy[0].state} job"
        return idle
    job = running[0]
    total = job.request.total_steps  # every best_of candidate's steps
    fraction = job.step / total
    elapsed = time.time() - (job.started or time.time())
    state.update(job="generating", job_timestamp=_timestamp(job.created), sampling_step=job.step,
                 sampling_steps=total)
    shown = job.preview is not None and job.owner == owner(request) and not skip_current_image
    return {"progress": fraction, "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
            "state": state, "current_image": b64_png(job.preview) if shown else None,
            "textinfo": f"step {job.step} of {total}"}


@router.post("/interrupt")
async def interrupt(request: Request, svc: Service = Depends(service)) -> dict:
    """Stops the running jobs that came through this API, each with the images it reached; native and OpenAI
    jobs are left alone."""
    await asyncio.to_thread(svc.scheduler.interrupt, API, owner(request))
    return {}


@router.get("/sd-models")
def sd_models(svc: Service = Depends(service)) -> list[dict]:
    return [{"title": _model_title(svc), "model_name": svc.pipe.name, "hash": svc.pipe.model_hash, "sha256": None,
             "filename": svc.pipe.name, "config": None}]  # a name, not the server's file path


@router.get("/samplers")
async def samplers() -> list[dict]:
    return [{"name": A1111_SAMPLER_NAMES[name], "aliases": [name], "options": {}} for name in SAMPLERS]


@router.get("/options")
def options(svc: Service = Depends(service)) -> dict:
    return {"sd_model_checkpoint": _model_title(svc), "sd_checkpoint_hash": None}


@router.post("/options")
def set_options(body: dict, svc: Service = Depends(service)) -> None:
    """Clients switch models by setting sd_model_checkpoint. A server runs the one model it loaded: naming it
    (title, name or hash, as /sd-models lists it) is accepted, another model is 400; other options are ignored."""
    wanted = body.get("sd_model_checkpoint")
    if wanted is not None and wanted not in (_model_title(svc), svc.pipe.name, svc.pipe.model_hash):
        raise ApiError(400, f"sd_model_checkpoint {wanted!r}: this server runs one model, {_model_title(svc)}, "
                            "and cannot switch: start another `brushwork serve --model NAME` for that one",
                       param="sd_model_checkpoint",
                       code="model_not_found")
    return None


@router.post("/png-info")
def png_info(body: A1111PngInfoRequest) -> dict:
    """The generation parameters stored in a PNG: the text, and parsed under AUTOMATIC1111's labels."""
    try:
        text = parameters_in_image(body.png_bytes())
    except BrushworkError as error:
        raise ApiError(400, str(error), param="image") from None
    return {"info": text, "items": {}, "parameters": labelled_parameters(text) if text else {}}


@router.get("/schedulers")
async def schedulers() -> list[dict]:
    """brushwork samples on the model's own noise schedule: AUTOMATIC1111's "Automatic"."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in SCHEDULE_TYPES.items()]


@router.get("/scripts")
async def scripts() -> dict:
    return {"txt2img": [], "img2img": []}
