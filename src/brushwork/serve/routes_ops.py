"""Operations: liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from brushwork.serve.common import Service, require_api_key, service

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(svc: Service = Depends(service)) -> JSONResponse:
    """The model is loaded and the generation thread takes jobs (503 while starting or shutting down)."""
    ok = svc.scheduler.ready
    return JSONResponse({"ready": ok, "model": svc.pipe.name, "queue_depth": svc.scheduler.queued_count()},
                        status_code=200 if ok else 503)


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def metrics(svc: Service = Depends(service)) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
