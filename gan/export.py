"""Portable artifacts of a run's EMA generator: a torch.export program (``.pt2``, the default), ONNX,
or TorchScript (deprecated by torch; still written on request and loaded with a warning), optionally
int8 or bf16, plus ``artifact.json`` saying what the model needs. Loads without this package:
``torch.export.load(artifact.json['file']).module()``, ``onnxruntime.InferenceSession`` or
``torch.jit.load``; inputs ``z`` float32 (N, z_dim) and ``y`` int64 (N,) with any batch size N (a dynamic
dimension), output float32 (N, C, H, W) in [-1, 1].

Spectral-norm parametrizations are baked into plain weights first (eval mode: the stored power-
iteration vectors, exactly what the eager eval-mode G computes).

int8: ``int8`` is dynamic quantization (torch: Linear layers only; onnxruntime: MatMul/Gemm weights).
``int8-static`` (ONNX only) is onnxruntime's static quantization of the whole graph, convolutions
included, calibrated on the generator's own inputs (z ~ N(0, 1), every class): no data set needed.
``bf16`` (torch.export or TorchScript) is the generator captured under CPU autocast to bfloat16 (inputs and output
stay float32); fast where the CPU has bf16 instructions (AVX512-BF16 / AMX), slow where it emulates them.
What each does to speed and images: docs/benchmarks.md.
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
import zipfile
from pathlib import Path

import torch

from gan.data import class_names
from gan.io import sha256_file, write_json_atomic
from gan.rundir import RunDir

FORMATS = ("export", "onnx", "torchscript")  # the first is the default
QUANTIZE = ("none", "int8", "int8-static", "bf16")
CALIBRATION = {"batches": 16, "batch_size": 64, "seed": 1234}  # int8-static: (z, y) batches it calibrates on
FILES = {"export": "generator.pt2", "torchscript": "generator.pt", "onnx": "generator.onnx"}
MAX_BATCH = 4096  # the dynamic batch dimension's upper bound (torch.export and ONNX)
ARTIFACT_JSON = "artifact.json"
# measured max |eager - artifact| is far below this (docs/benchmarks.md); fp32 reorderings only
PARITY_TOL = {"none": 1e-4, "int8": None, "int8-static": None, "bf16": None}


class ExportError(ValueError):
    """An export or artifact that cannot be used: the message names the path and the fix."""


def pick_weights(run_dir: str | Path, checkpoint: str | None = None, best: bool = False) -> Path | None:
    """--checkpoint PATH, else RUN/best (--best), else RUN/export (the newest export); None = let
    gan.metrics.load_generator choose (newest checkpoint)."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise ExportError(f"run directory not found: {run_dir} (no config.yaml). Pass the --run-dir of a "
                          f"launch/train.py run")
    if checkpoint:
        return Path(checkpoint)
    weights = run.best_weights if best else run.export_weights
    if not weights.is_file():
        if best:
            raise ExportError(f"{run_dir} has no best/G_ema.safetensors (written when metrics.every > 0 during "
                              f"training); drop --best or evaluate during training")
        raise ExportError(f"{run_dir} has no export/G_ema.safetensors yet (written with every checkpoint): "
                          f"train it first, or pass --checkpoint PATH")
    return weights


def run_metrics(run_dir: str | Path, label: str) -> dict:
    run = RunDir(run_dir)
    try:
        if label == "best" and run.best_json.is_file():
            return dict(json.loads(run.best_json.read_text()).get("metrics", {}))
        if run.metrics_json.is_file():
            return dict(json.loads(run.metrics_json.read_text()).get("evaluations", {}).get(label, {}).get("metrics", {}))
    except (OSError, json.JSONDecodeError):
        pass
    return {}


def bake(G: torch.nn.Module) -> torch.nn.Module:
    """G, in place: eval mode, parametrizations (spectral norm) replaced by their current weights.
    (In place because ``copy.deepcopy`` of a parametrized module does not give a removable copy.)"""
    import torch.nn.utils.parametrize as P

    G = G.cpu().eval()
    for m in list(G.modules()):
        if P.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                P.remove_parametrizations(m, name, leave_parametrized=True)
    return G.requires_grad_(False)


def quantize_dynamic(G: torch.nn.Module) -> torch.nn.Module:
    """torch dynamic int8 quantization (Linear layers; convolutions stay fp32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(G, {torch.nn.Linear}, dtype=torch.qint8)


class Bf16Autocast(torch.nn.Module):
    """``G`` run under CPU autocast to bfloat16; float32 in and out (traced: the casts are in the graph)."""

    def __init__(self, G: torch.nn.Module):
        super().__init__()
        self.G = G

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.G(z, y).float()


def example_inputs(z_dim: int, num_classes: int, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=g), torch.arange(n) % num_classes


def _batch_dim() -> dict:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {"z": {0: batch}, "y": {0: batch}}


def save_program(G, z, y, path: Path) -> None:
    """A torch.export program with a dynamic batch dimension, written atomically."""
    prog = torch.export.export(G, (z, y), dynamic_shapes=_batch_dim())
    tmp = path.with_name(f".tmp-{path.name}")
    torch.export.save(prog, str(tmp))
    tmp.replace(path)


def check_program_file(path: Path) -> None:
    """Refuse, with the fix, what torch.export.load would meet with a logged traceback: a file that is not
    a .pt2 archive (a TorchScript file in particular) or one written with another export schema version."""
    from torch._export.serde.schema import SCHEMA_VERSION

    again = "export it again with `python launch/export.py --run RUN --out DIR`"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            fmt = next((n for n in names if n.endswith("/archive_format") or n == "archive_format"), None)
            if fmt is None or zf.read(fmt).strip() != b"pt2":
                if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                    raise ExportError(f"{path} is a TorchScript file, not a torch.export program (.pt2): its "
                                      f"artifact.json must say \"format\": \"torchscript\", or {again}")
                raise ExportError(f"{path} is not a torch.export program (no pt2 archive_format); {again}")
            model = next((n for n in names if "/models/" in n and n.endswith(".json")), None)
            info = json.loads(zf.read(model)) if model else {}
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not a torch.export program ({e}); {again}") from None
    version = info.get("schema_version") or {}
    if version.get("major") != SCHEMA_VERSION[0]:
        raise ExportError(f"{path} was written by torch {info.get('torch_version', '?')} with export schema "
                          f"{version.get('major')}.{version.get('minor')}; this torch ({torch.__version__}) reads "
                          f"schema {SCHEMA_VERSION[0]}.x: {again}")


def load_program(path: Path, device: torch.device) -> torch.nn.Module:
    check_program_file(path)
    log = logging.getLogger("torch.export")
    level, log.level = log.level, logging.ERROR  # torch logs a traceback before it raises: our message says it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch.frombuffer of the read-only weights
            return torch.export.load(str(path)).module().to(device)
    except Exception as e:  # noqa: BLE001 (deserialization raises many types)
        raise ExportError(f"{path} is not a loadable torch.export program ({str(e).splitlines()[0]}); "
                          f"export it again") from None
    finally:
        log.level = level


def save_torchscript(G, z, y, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.trace(G, (z, y), check_trace=False)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.jit.save(ts, str(tmp))
    tmp.replace(path)


def calibration_inputs(z_dim: int, num_classes: int) -> list[dict]:
    """int8-static calibration: CALIBRATION batches of z ~ N(0, 1) and classes 0, 1, ... in turn."""
    g = torch.Generator().manual_seed(CALIBRATION["seed"])
    n = CALIBRATION["batch_size"]
    return [{"z": torch.randn(n, z_dim, generator=g).numpy(), "y": (torch.arange(n) % num_classes).numpy()}
            for _ in range(CALIBRATION["batches"])]


def save_onnx(G, z, y, path: Path, quantize: str, num_classes: int = 1) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(G, (z, y), input_names=["z", "y"], output_names=["images"],
                                 dynamic_shapes=_batch_dim(), dynamo=True, verbose=False)
    prog.save(str(tmp))
    if quantize != "none":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic as ort_qd, quantize_static

        q = path.with_name(f".tmp-q-{path.name}")
        if quantize == "int8":  # onnxruntime's dynamic quantization (MatMul/Gemm weights to int8)
            ort_qd(str(tmp), str(q), weight_type=QuantType.QInt8)
        else:  # static: every Conv/MatMul/Gemm with int8 kernels (uint8 activations, int8 weights: x86's fast path)
            batches = iter(calibration_inputs(z.shape[1], num_classes))

            class Reader:  # onnxruntime's CalibrationDataReader protocol
                def get_next(self):
                    return next(batches, None)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(str(tmp), str(q), Reader(), quant_format=QuantFormat.QOperator,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        tmp.unlink()
        tmp = q
    tmp.replace(path)


def export(run_dir: str | Path, out_dir: str | Path, fmt: str = FORMATS[0], quantize: str = "none",
           checkpoint: str | None = None, best: bool = False) -> dict:
    """Write ``out_dir/generator.{pt2,onnx,pt}`` + ``artifact.json``; check the artifact against the eager
    G on fresh inputs (another batch size than the trace) and record the max abs difference."""
    from gan.metrics import load_generator

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise ExportError(f"--quantize {quantize!r} is not one of: {', '.join(QUANTIZE)}")
    if quantize == "int8-static" and fmt != "onnx":
        raise ExportError("--quantize int8-static needs --format onnx (onnxruntime's static int8); torch's static "
                          "int8 of transposed convolutions was wrong (x86 engine) or slower (fbgemm): "
                          "docs/benchmarks.md")
    if quantize == "bf16" and fmt == "onnx":
        raise ExportError("--quantize bf16 needs --format export or torchscript (captured under CPU autocast); "
                          "onnxruntime's CPU provider has no bf16 convolutions")
    loaded = load_generator(run_dir, pick_weights(run_dir, checkpoint, best), "cpu")
    cfg, m = loaded.cfg, loaded.cfg.model
    base = bake(loaded.G)
    G = base  # ONNX int8 variants are quantized by onnxruntime after the fp32 export
    if fmt != "onnx" and quantize == "int8":
        G = quantize_dynamic(base)
    elif quantize == "bf16":
        G = Bf16Autocast(base)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILES[fmt]
    z, y = example_inputs(m.z_dim, m.num_classes, 4)
    save = {"export": save_program, "torchscript": save_torchscript}.get(fmt)
    (save or (lambda *a: save_onnx(*a, quantize, m.num_classes)))(G, z, y, path)
    art = Artifact(out, expect_sha=False, meta={"format": fmt, "file": path.name})
    zc, yc = example_inputs(m.z_dim, m.num_classes, 7, seed=1)
    with torch.no_grad():
        ref = base(zc, yc)
    diff = float((art(zc, yc) - ref).abs().max())
    tol = PARITY_TOL[quantize]
    if tol is not None and not diff <= tol:
        raise ExportError(f"the {fmt} artifact differs from the eager generator by {diff:.3g} (> {tol}); not written")
    meta = {"format_version": 1, "format": fmt, "file": path.name, "sha256": sha256_file(path), "quantize": quantize,
            "model": m.name, "model_config": {k: getattr(m, k) for k in m.__dataclass_fields__},
            "z_dim": m.z_dim, "num_classes": m.num_classes, "class_names": class_names(cfg.data.shards, m.num_classes),
            "image_shape": [m.img_channels, m.img_size, m.img_size], "output_range": [-1, 1],
            "inputs": {"z": ["float32", "N", m.z_dim], "y": ["int64", "N"]},
            "step": loaded.step, "source": str(loaded.source), "label": loaded.label, "run": str(Path(run_dir)),
            "metrics": run_metrics(run_dir, loaded.label), "parity_max_abs_diff": diff, "parity_tolerance": tol,
            **({"calibration": CALIBRATION} if quantize == "int8-static" else {})}
    write_json_atomic(out / ARTIFACT_JSON, meta)
    return meta


class Artifact:
    """A loaded artifact: ``artifact(z, y)`` -> float (N, C, H, W) on the CPU. Verifies artifact.json
    and the model file's sha256 before use."""

    def __init__(self, directory: str | Path, device: str = "cpu", expect_sha: bool = True, meta: dict | None = None,
                 threads: int = 0):
        d = Path(directory)
        if meta is None:
            p = d / ARTIFACT_JSON
            if not p.is_file():
                raise ExportError(f"{d} is not an exported artifact (no {ARTIFACT_JSON}); make one with "
                                  f"`python launch/export.py --run RUN --out {d}`")
            try:
                meta = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ExportError(f"{p} is not valid JSON ({e}); export again") from None
        fmt = meta.get("format")
        if fmt not in FORMATS:
            raise ExportError(f"{d}: artifact format {fmt!r} is not one this server loads ({', '.join(FORMATS)})")
        self.path = d / str(meta.get("file", ""))
        if not self.path.is_file():
            raise ExportError(f"{d}: the model file {self.path.name!r} named in {ARTIFACT_JSON} is missing; export again")
        if expect_sha and meta.get("sha256") != sha256_file(self.path):
            raise ExportError(f"{self.path} does not match the sha256 in {ARTIFACT_JSON} (damaged or replaced); "
                              f"export again")
        self.meta, self.format, self.device = meta, fmt, torch.device(device)
        if fmt == "export":
            self.module = load_program(self.path, self.device)
        elif fmt == "torchscript":
            print(f"warning: {self.path} is TorchScript, which torch deprecates; export it again as a torch.export "
                  f"program (the default of launch/export.py)", file=sys.stderr, flush=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit.load's own deprecation warning: said above
                    self.module = torch.jit.load(str(self.path), map_location=self.device).eval()
            except RuntimeError as e:
                raise ExportError(f"{self.path} is not a loadable TorchScript file ({str(e).splitlines()[0]})") from None
        else:
            import onnxruntime as ort

            providers = (["CUDAExecutionProvider"] if self.device.type == "cuda" else []) + ["CPUExecutionProvider"]
            try:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads  # 0 = onnxruntime's default (all cores)
                self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
            except Exception as e:  # noqa: BLE001 (onnxruntime raises its own exception types)
                raise ExportError(f"{self.path} is not a loadable ONNX model ({e})") from None

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.format != "onnx":
            return self.module(z.to(self.device), y.to(self.device)).float().cpu()
        out = self.session.run(None, {"z": z.float().cpu().numpy(), "y": y.long().cpu().numpy()})[0]
        return torch.from_numpy(out)
