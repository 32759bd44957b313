"""Operations: `GET /health`, the prompt cache's stats and reset."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

from typing import Any

from fastapi import APIRouter

from ..deps import Admin, Svc

router = APIRouter()


@router.get("/health")
async def health(svc: Svc) -> dict[str, Any]:
    """Reachability of kernel_mcp, the model, and whether start-up work is done (`warm`)."""
    settings = svc.settings
    reachable = await svc.kernels.reachable()
    return {
        "status": "ok" if reachable else "degraded",
        "warm": svc.warm,
        "model_configured": settings.model is not None,
        "model": settings.model,
        "models": settings.model_ids,
        "kernel_mcp": {"url": settings.mcp_url, "reachable": reachable},
        "prompt_cache": svc.prompts.stats(),
    }


@router.get("/admin/cache-stats")
async def cache_stats(svc: Svc, caller: Admin) -> dict[str, Any]:
    """This replica's prompt cache, and under `replicas` which prompt each replica serves."""
    return {
        **svc.prompts.stats(),
        "replica": svc.replicas.name,
        "replicas": await svc.replicas.members(),
    }


@router.post("/admin/clear-cache")
async def clear_cache(svc: Svc, caller: Admin) -> dict[str, Any]:
    """Drop the cached prompt here and on every other replica."""
    svc.prompts.clear()
    await svc.replicas.clear_prompts()
    return {"cleared": True, **svc.prompts.stats(), "replica": svc.replicas.name}
