"""OpenAI-compatible image generation: POST /v1/images/generations, answered when the images are ready."""

import time

from fastapi import APIRouter, Depends, Request

from brushwork.serve.common import ApiError, Service, b64_png, owner, service
from brushwork.serve.jobs import SUCCEEDED
from brushwork.serve.schemas import OpenAIImageRequest

router = APIRouter()

# OpenAI's image models: clients that send one by default get this server's model.
OPENAI_IMAGE_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini")


@router.get("/v1/models")
async def models(svc: Service = Depends(service)) -> dict:
    """The one model this server runs (clients list models before they pick one)."""
    return {"object": "list", "data": [{"id": svc.pipe.name, "object": "model", "created": 0, "owned_by": "brushwork"}]}


@router.post("/v1/images/generations")
async def images_generations(body: OpenAIImageRequest, request: Request, svc: Service = Depends(service)) -> dict:
    svc.check_model(body.model, OPENAI_IMAGE_MODELS)
    width, height = body.width_height()
    job = svc.submit(svc.job_request(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                                     guidance=body.guidance, seed=body.seed, n=body.n, sampler=body.sampler,
                                     width=width, height=height, size_param="size"), api="openai",
                     owner=owner(request))
    await svc.wait(job, request)
    if job.state != SUCCEEDED:
        raise ApiError(job.error_status, f"image generation {job.state}: {job.error}",
                       type="server_error" if job.error_status >= 500 else "invalid_request_error",
                       kind=None)  # counted when the job finished
    if body.response_format == "url":
        base = (svc.config.public_url or str(request.base_url)).rstrip("/")
        data = [{"url": f"{base}/v1/jobs/{job.id}/images/{i}.png", "revised_prompt": None}
                for i in range(len(job.images))]
    else:
        data = [{"b64_json": b64_png(image.png), "revised_prompt": None} for image in job.images]
    return {"created": int(time.time()), "data": data, "output_format": "png"}
