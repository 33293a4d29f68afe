"""The FastAPI app: ``POST /generate``, ``GET /info``, ``GET /health``, ``GET /metrics``, the page at ``/``,
and FastAPI's own OpenAPI docs at ``/docs``."""

import base64
import contextlib
import secrets
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gan.serve.batcher import Batcher, QueueFull
from gan.serve.model import latents
from gan.viz import make_grid_uint8, to_uint8

PAGE = Path(__file__).with_name("page.html")
MAX_SEED = 2 ** 63 - 1
MAX_TRUNCATION = 4.0


def png_bytes(img: torch.Tensor) -> bytes:
    """(C, H, W) image in [-1, 1] or uint8, C = 1 or 3, -> PNG bytes. torchvision's libpng encoder takes the
    uint8 tensor as it is (no HWC copy, no PIL), which costs less per request (docs/benchmarks.md)."""
    from torchvision.io import encode_png

    return encode_png(to_uint8(img)).numpy().tobytes()


def batch_dependence(info: dict) -> str | None:
    """Why this model's images would depend on the other requests in their forward pass, or None. Dynamic
    int8 quantizes activations with a scale computed from the whole batch (measured in docs/benchmarks.md:
    up to 0.21 max difference between the same (z, y) alone and batched)."""
    if info.get("quantize") == "int8":
        return ("cross-request batching off: a dynamic int8 artifact quantizes activations per batch, so an "
                "image would depend on the requests it is batched with; export with --quantize int8-static "
                "(ONNX) or bf16 (TorchScript) to batch")
    return None


def create_app(model, max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 256, max_n: int = 64,
               retry_after_s: int = 1) -> FastAPI:
    names = model.class_names
    allowed = {"class": f"an index 0..{len(names) - 1} or one of the names {', '.join(names)}",
               "n": f"an integer 1..{max_n}", "seed": f"an integer 0..{MAX_SEED}",
               "truncation": f"a number in (0, {MAX_TRUNCATION}], or 0/absent for none"}

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        cls: int | str = Field(alias="class", description=allowed["class"])
        n: int = Field(1, ge=1, le=max_n, description=allowed["n"])
        seed: int | None = Field(None, ge=0, le=MAX_SEED, description=allowed["seed"])
        truncation: float | None = Field(None, ge=0, le=MAX_TRUNCATION, description=allowed["truncation"])

    note = batch_dependence(model.info)
    if note:  # same seed -> same images must hold however requests arrive: one forward pass per request
        max_batch = 0
    # uint8 once per forward pass, in the batcher's thread (as is each request's PNG encoding: see generate)
    batcher = Batcher(lambda z, y: to_uint8(model(z, y)), max_batch, max_wait_ms, max_queue, note=note)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="gan-train generator", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, field: str, message: str) -> JSONResponse:
        return JSONResponse({"detail": [{"field": field, "message": message, "allowed": allowed.get(field, "")}]},
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        details = []
        status = 422
        for e in exc.errors():
            loc = [str(p) for p in e.get("loc", []) if p != "body"]
            field = loc[0] if loc else "body"
            if e.get("type") in ("json_invalid", "model_attributes_type", "dict_type") or field == "body":
                status, field = 400, "body"
                msg = ("the body must be a JSON object like {\"class\": 0, \"n\": 4, \"seed\": 1} "
                       f"with Content-Type: application/json ({e.get('msg')})")
            else:
                msg = f"{field}: {e.get('msg')}"
            details.append({"field": field, "message": msg,
                            "allowed": allowed.get(field, "fields: class, n, seed, truncation")})
        return JSONResponse({"detail": details}, status_code=status)

    @app.post("/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def generate(req: GenerateRequest, request: Request):
        """A PNG grid (Accept: image/png, the default) or JSON with one base64 PNG per image."""
        if isinstance(req.cls, str) and not req.cls.lstrip("-").isdigit():
            if req.cls not in names:
                return error(422, "class", f"class: unknown class name {req.cls!r}")
            k = names.index(req.cls)
        else:
            k = int(req.cls)
            if not 0 <= k < len(names):
                return error(422, "class", f"class: {k} is out of range")
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
        z = latents(req.n, model.z_dim, seed, req.truncation or None)
        as_json = "application/json" in request.headers.get("accept", "")
        nrow = min(8, req.n)
        # PNG encoding runs in the batcher's thread right after the forward pass, not on the event loop
        encode = (lambda ims: [base64.b64encode(png_bytes(im)).decode() for im in ims]) if as_json else (
            lambda ims: png_bytes(make_grid_uint8(ims, nrow=nrow)))
        try:
            encoded = await batcher.submit(z, torch.full((req.n,), k, dtype=torch.long), encode)
        except QueueFull as e:
            return JSONResponse({"detail": f"server busy: {e}; retry after {retry_after_s} s"}, status_code=503,
                                headers={"Retry-After": str(retry_after_s)})
        headers = {"X-Seed": str(seed), "X-Class": names[k]}
        if as_json:
            return JSONResponse({"class": k, "class_name": names[k], "seed": seed, "truncation": req.truncation,
                                 "images": encoded}, headers=headers)
        return Response(encoded, media_type="image/png", headers=headers)

    @app.get("/info")
    async def info():
        """The model (run, step, metrics, classes, image shape, device) and the batching counters."""
        return {**model.info, "classes": [{"index": i, "name": n} for i, n in enumerate(names)],
                "max_n": max_n, "max_truncation": MAX_TRUNCATION, "batching": batcher.stats()}

    @app.get("/metrics")
    async def metrics():
        """Batching counters: requests, rejections, forward passes, histogram of images per forward pass."""
        return batcher.stats()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app
