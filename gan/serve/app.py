"""The FastAPI app: ``POST /<mode>`` for each mode of the model's family (``/generate``: JSON body;
``/reconstruct``, ``/translate``: an uploaded image, multipart field ``file``; another mode: 404 naming the
model's), ``GET /info``, ``GET /health``, ``GET /metrics``, the page at ``/``, and FastAPI's own OpenAPI
docs at ``/docs``."""

import base64
import contextlib
import secrets
from pathlib import Path

import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gan.serve.batcher import Batcher, QueueFull
from gan.serve.model import latents
from gan.serve.uploads import UploadError, UploadLimit, read_image
from gan.viz import make_grid_uint8, to_uint8

PAGE = Path(__file__).with_name("page.html")
MAX_SEED = 2 ** 63 - 1
MAX_TRUNCATION = 4.0
MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # launch/serve.py --max-upload-bytes


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


def _class_index(value, names: list[str]) -> int:
    """A class given by index or name -> its index; ValueError with the reason."""
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if value not in names:
            raise ValueError(f"class: unknown class name {value!r}")
        return names.index(value)
    k = int(value)
    if not 0 <= k < len(names):
        raise ValueError(f"class: {k} is out of range")
    return k


def create_app(model, max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 256, max_n: int = 64,
               retry_after_s: int = 1, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    names = model.class_names
    modes = model.modes  # {name: gan.family.Mode}, the family's order
    family = model.info.get("family", "gan")
    offered = ", ".join(f"{n} (POST /{n})" for n in modes)
    allowed = {"class": f"an index 0..{len(names) - 1} or one of the names {', '.join(names)}" if names else
               "nothing: this model takes no class",
               "n": f"an integer 1..{max_n}", "seed": f"an integer 0..{MAX_SEED}",
               "truncation": f"a number in (0, {MAX_TRUNCATION}], or 0/absent for none",
               "file": "an image (PNG, JPEG, ...) in a multipart/form-data field named file, of the model's size and "
                       "channels (see GET /info)",
               "resize": "true: stretch an image of another size to the model's; false (default): refuse it"}

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        cls: int | str | None = Field(None, alias="class", description=allowed["class"])
        n: int = Field(1, ge=1, le=max_n, description=allowed["n"])
        seed: int | None = Field(None, ge=0, le=MAX_SEED, description=allowed["seed"])
        truncation: float | None = Field(None, ge=0, le=MAX_TRUNCATION, description=allowed["truncation"])

    note = batch_dependence(model.info)
    if note:  # same seed -> same images must hold however requests arrive: one forward pass per request
        max_batch = 0

    def forward(mode):  # uint8 once per forward pass, in the batcher's thread (as is each request's PNG encoding)
        return lambda x, y: to_uint8(model.run(mode, x) if y is None else model.run(mode, x, y))

    batcher = Batcher({name: forward(name) for name in modes}, max_batch, max_wait_ms, max_queue, note=note)
    image_paths = {f"/{n}" for n, m in modes.items() if m.input("image")}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"gan-train {family} model", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(UploadLimit, paths=image_paths, max_bytes=max_upload_bytes)

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

    def classes_for(mode, value, n: int):
        """The class tensor of ``mode`` for ``value`` (a request's class), None for a mode without one, or an
        error response."""
        y = mode.input("class") or mode.input("unused")
        if y is None or y.kind == "unused":
            if value is not None:
                why = " (its decoder is not class-conditional)" if y is not None else ""
                return None, error(422, "class", f"class: this {family} model's {mode.name} takes no class{why}; "
                                                 f"leave class out")
            return (torch.zeros(n, dtype=torch.long) if y is not None else None), None
        if value is None or value == "":
            return None, error(422, "class", f"class: required: this model's {mode.name} is class-conditional")
        try:
            k = _class_index(value, names)
        except ValueError as e:
            return None, error(422, "class", str(e))
        return torch.full((n,), k, dtype=torch.long), None

    async def answer(mode: str, x, y, request: Request, headers: dict, fields: dict, nrow: int | None = None):
        """Run ``mode`` through the batcher: a PNG (a grid of ``nrow`` per row, or the one image when None) or
        JSON with one base64 PNG per image (Accept: application/json)."""
        as_json = "application/json" in request.headers.get("accept", "")
        # PNG encoding runs in the batcher's thread right after the forward pass, not on the event loop
        encode = (lambda ims: [base64.b64encode(png_bytes(im)).decode() for im in ims]) if as_json else (
            lambda ims: png_bytes(make_grid_uint8(ims, nrow=nrow) if nrow else ims[0]))
        try:
            encoded = await batcher.submit(x, y, encode, mode=mode)
        except QueueFull as e:
            return JSONResponse({"detail": f"server busy: {e}; retry after {retry_after_s} s"}, status_code=503,
                                headers={"Retry-After": str(retry_after_s)})
        if as_json:
            return JSONResponse({**fields, "images": encoded}, headers=headers)
        return Response(encoded, media_type="image/png", headers=headers)

    if "generate" in modes:
        @app.post("/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
        async def generate(req: GenerateRequest, request: Request):
            """A PNG grid (Accept: image/png, the default) or JSON with one base64 PNG per image."""
            y, bad = classes_for(modes["generate"], req.cls, req.n)
            if bad:
                return bad
            seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
            z = latents(req.n, model.z_dim, seed, req.truncation or None)
            headers = {"X-Seed": str(seed)}
            fields = {"seed": seed, "truncation": req.truncation}
            if req.cls is not None:
                k = int(y[0])
                headers["X-Class"], fields["class"], fields["class_name"] = names[k], k, names[k]
            return await answer("generate", z, y, request, headers, fields, nrow=min(8, req.n))

    def image_endpoint(mode):
        shape = mode.input("image").shape  # ("N", C, H, W)
        takes_class = mode.input("class") is not None

        async def run_mode(request: Request, file: UploadFile = File(..., description=allowed["file"]),
                           cls: str | None = Form(None, alias="class", description=allowed["class"]),
                           resize: bool = Form(False, description=allowed["resize"])):
            y, bad = classes_for(mode, cls, 1)
            if bad:
                return bad
            try:
                x, resized = read_image(await file.read(), int(shape[1]), int(shape[2]), resize)
            except UploadError as e:
                return error(e.status, e.field, str(e))
            headers = {"X-Resized-From": f"{resized[0]}x{resized[1]}"} if resized else {}
            fields = {"mode": mode.name, **({"resized_from": list(resized)} if resized else {})}
            if takes_class:
                fields["class"] = int(y[0])
            return await answer(mode.name, x, y, request, headers, fields)

        run_mode.__doc__ = (f"{mode.doc}: upload one image (multipart/form-data, field file; {shape[1]} channels, "
                            f"{shape[2]}x{shape[3]}; another size is refused unless resize=true"
                            + ("; field class: required, the decoder is class-conditional" if takes_class else "")
                            + f"). Answers a PNG (Accept: image/png, the default) or JSON with a base64 PNG. "
                            f"Bodies over {max_upload_bytes} bytes: 413.")
        return run_mode

    for name, mode in modes.items():
        if mode.input("image"):
            app.add_api_route(f"/{name}", image_endpoint(mode), methods=["POST"], name=name,
                              responses={200: {"content": {"image/png": {}, "application/json": {}}}})

    @app.get("/info")
    async def info():
        """The model (family and modes, run, step, metrics, classes, image shape, device) and the batching counters."""
        return {**model.info, "classes": [{"index": i, "name": n} for i, n in enumerate(names)],
                "max_n": max_n, "max_truncation": MAX_TRUNCATION, "max_upload_bytes": max_upload_bytes,
                "batching": batcher.stats()}

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

    @app.post("/{name}", include_in_schema=False)
    async def no_such_mode(name: str):
        """Any other POST: a mode this model's family does not have (e.g. /generate on pix2pix)."""
        return JSONResponse({"detail": [{"field": "mode", "message": f"POST /{name}: this {family} model has no "
                                         f"{name!r} mode; its modes: {offered}", "allowed": offered}]},
                            status_code=404)

    return app
