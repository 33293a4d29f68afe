"""Portable artifacts of a run's EMA network: one program per mode of its family (gan.family: the GAN's
``generate``; the VAE's ``generate`` and ``reconstruct``; pix2pix's ``translate``) as a torch.export
program (``.pt2``, the default), ONNX, or TorchScript (deprecated by torch; still written on request and
loaded with a warning), optionally int8 or bf16, plus ``artifact.json`` saying what each mode takes and
gives. Loads without this package: ``torch.export.load(file).module()``, ``onnxruntime.InferenceSession``
or ``torch.jit.load``. Every input has a dynamic batch dimension N; the GAN's ``generate`` takes ``z``
float32 (N, z_dim) and ``y`` int64 (N,), image modes ``image`` float32 (N, C, H, W) in [-1, 1]; the
output is float32 (N, C, H, W) in [-1, 1].

``artifact.json`` (format_version 2): ``family``, ``format``, ``quantize``, ``mode`` (the default mode) and
``modes`` ({name: {inputs, output, doc, parity_max_abs_diff}}, in the family's order). ``file`` and
``sha256`` at the top level are the default mode's program (where format 1 readers find it); every other
mode names its own ``file`` and ``sha256`` in its entry. The generate mode's program is
``generator.<ext>``, any other mode's ``<mode>.<ext>``. An artifact.json without ``modes`` (format 1)
is the GAN's ``generate``.

Spectral-norm parametrizations are baked into plain weights first (eval mode: the stored power-
iteration vectors, exactly what the eager eval-mode network computes).

int8: ``int8`` is dynamic quantization (torch: Linear layers only; onnxruntime: MatMul/Gemm weights).
``int8-static`` (ONNX only) is onnxruntime's static quantization of the whole graph, convolutions
included, calibrated on the network's own inputs (z ~ N(0, 1), every class): no data set needed, so it
applies to modes without an image input only (an image mode would need real images to calibrate on).
``bf16`` (torch.export or TorchScript) is the network captured under CPU autocast to bfloat16 (inputs and
output stay float32); fast where the CPU has bf16 instructions (AVX512-BF16 / AMX), slow where it
emulates them. What each does to speed and images: docs/benchmarks.md.
"""
from __future__ import annotations

import inspect
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


def run_metrics(run_dir: str | Path, label: str, step: int | None = None) -> dict:
    """The metrics of the network an artifact holds, as the run has them now: RUN/best.json's for ``label``
    "best"; else RUN/metrics.json's evaluations of the same network: its own label's, and those of the
    same ``step`` under a checkpoint or export label (RUN/export/ is the EMA network of the newest
    checkpoint, so launch/evaluate.py's default, that checkpoint, measured it), the label's own winning.
    Evaluations of the trained network (``"net": "trained"``) are not the artifact's: never counted."""
    run = RunDir(run_dir)
    try:
        if label == "best":
            return dict(json.loads(run.best_json.read_text()).get("metrics", {})) if run.best_json.is_file() else {}
        if run.metrics_json.is_file():
            evals = json.loads(run.metrics_json.read_text()).get("evaluations", {})
            same = [e for k, e in evals.items() if k != label and step is not None and e.get("step") == step
                    and (k == "export" or k.startswith("step-")) and e.get("net", "ema") == "ema"]
            out = {}
            for e in [*same, evals.get(label, {})]:
                out.update(e.get("metrics", {}))
            return out
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
    """``net`` run under CPU autocast to bfloat16; float32 in and out (traced: the casts are in the graph)."""

    def __init__(self, G: torch.nn.Module):
        super().__init__()
        self.G = G

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.G(*inputs).float()


def _batch_dims(module: torch.nn.Module, n_inputs: int) -> tuple:
    """Every input's first dimension is the same dynamic batch: one dict per input, positional (nested once
    for a ``forward(*inputs)``, as Bf16Autocast's, which torch.export reads as one argument)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dims = tuple({0: batch} for _ in range(n_inputs))
    params = inspect.signature(module.forward).parameters.values()
    return (dims,) if any(p.kind is p.VAR_POSITIONAL for p in params) else dims


def program_file(mode: str, fmt: str) -> str:
    """``generator.<ext>`` for the generate mode (as before modes), ``<mode>.<ext>`` for any other."""
    name = FILES[fmt]
    return name if mode == "generate" else f"{mode}{Path(name).suffix}"


def save_program(G, inputs: tuple, path: Path) -> None:
    """A torch.export program with a dynamic batch dimension, written atomically."""
    prog = torch.export.export(G, tuple(inputs), dynamic_shapes=_batch_dims(G, len(inputs)))
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


def save_torchscript(G, inputs: tuple, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.trace(G, tuple(inputs), check_trace=False)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.jit.save(ts, str(tmp))
    tmp.replace(path)


def calibration_inputs(z_dim: int, num_classes: int) -> list[dict]:
    """int8-static calibration: CALIBRATION batches of z ~ N(0, 1) and classes 0, 1, ... in turn."""
    g = torch.Generator().manual_seed(CALIBRATION["seed"])
    n = CALIBRATION["batch_size"]
    return [{"z": torch.randn(n, z_dim, generator=g).numpy(), "y": (torch.arange(n) % num_classes).numpy()}
            for _ in range(CALIBRATION["batches"])]


def save_onnx(G, inputs: tuple, names: list[str], path: Path, quantize: str, calibration=None) -> None:
    """ONNX with input names ``names`` and output ``images``; int8 by onnxruntime after the fp32 export
    (``calibration``: a callable giving int8-static's batches, {input name: array})."""
    tmp = path.with_name(f".tmp-{path.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(G, tuple(inputs), input_names=list(names), output_names=["images"],
                                 dynamic_shapes=_batch_dims(G, len(inputs)), dynamo=True, verbose=False)
    prog.save(str(tmp))
    if quantize != "none":
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic as ort_qd, quantize_static

        q = path.with_name(f".tmp-q-{path.name}")
        if quantize == "int8":  # onnxruntime's dynamic quantization (MatMul/Gemm weights to int8)
            ort_qd(str(tmp), str(q), weight_type=QuantType.QInt8)
        else:  # static: every Conv/MatMul/Gemm with int8 kernels (uint8 activations, int8 weights: x86's fast path)
            batches = iter(calibration())

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


def _calibration(mode, num_classes: int):
    """int8-static batches for a mode whose inputs are noise and classes (calibration_inputs, by name)."""
    def batches():
        z, y = mode.inputs  # export() refused int8-static for modes with an image input
        return [{z.name: b["z"], y.name: b["y"]} for b in calibration_inputs(z.shape[1], num_classes)]
    return batches


def _mode_names(family, wanted) -> list[str]:
    have = [m.name for m in family.modes()]
    if not wanted:
        return have
    unknown = [w for w in wanted if w not in have]
    if unknown:
        raise ExportError(f"--modes {','.join(unknown)}: the {family.name} family has no such mode; its modes: "
                          f"{', '.join(have)}")
    return [m for m in have if m in wanted]  # the family's order; the first is the artifact's default


def export(run_dir: str | Path, out_dir: str | Path, fmt: str = FORMATS[0], quantize: str = "none",
           checkpoint: str | None = None, best: bool = False, modes: list[str] | None = None) -> dict:
    """Write one program per mode (``modes``: a subset, default all of the family's) + ``artifact.json`` into
    ``out_dir``; check each program against the eager network on fresh inputs (another batch size than the
    trace) and record the max abs difference per mode."""
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
    m, family = loaded.cfg.model, loaded.family
    names = _mode_names(family, modes)
    if quantize == "int8-static":
        takes_images = [n for n in names if family.mode(n).input("image")]
        if takes_images:
            raise ExportError(f"--quantize int8-static calibrates on the network's own inputs (noise and classes), "
                              f"but the {family.name} mode(s) {', '.join(takes_images)} take images, which would need "
                              f"real images to calibrate on (not offered). Export them with --quantize none, int8 or "
                              f"bf16" + (", or pick --modes generate" if "generate" in names else ""))
    base = bake(loaded.G)
    if fmt == "export" and quantize == "int8" and any(isinstance(x, torch.nn.Linear) for x in base.modules()):
        raise ExportError(f"--quantize int8 --format export: torch.export cannot capture torch's dynamically "
                          f"quantized Linear layers, and the {family.name} network has some; use --format onnx "
                          f"--quantize int8 (onnxruntime's), or --format torchscript --quantize int8")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    num_classes = getattr(m, "num_classes", 1)
    for name in names:
        mode, net = family.mode(name), family.mode_forward(base, name)
        if fmt != "onnx" and quantize == "int8":  # ONNX int8 variants are quantized by onnxruntime after the fp32 export
            net = quantize_dynamic(net)
        elif quantize == "bf16":
            net = Bf16Autocast(net)
        path = out / program_file(name, fmt)
        inputs = family.mode_inputs(name, 4)
        if fmt == "onnx":
            save_onnx(net, inputs, [t.name for t in mode.inputs], path, quantize, _calibration(mode, num_classes))
        else:
            {"export": save_program, "torchscript": save_torchscript}[fmt](net, inputs, path)
        entries[name] = {**mode.to_json(), "file": path.name, "sha256": sha256_file(path)}
    default = entries[names[0]]
    meta = {"format_version": 2, "family": family.name, "format": fmt, "file": default["file"],
            "sha256": default["sha256"], "quantize": quantize, "mode": names[0],
            "modes": {n: {k: v for k, v in e.items() if n != names[0] or k not in ("file", "sha256")}
                      for n, e in entries.items()}}
    art = Artifact(out, meta=meta)  # what a server loads, checked against the eager network, per mode
    tol = PARITY_TOL[quantize]
    for name in names:
        fresh = family.mode_inputs(name, 7, seed=1)
        with torch.no_grad():
            ref = family.mode_forward(base, name)(*fresh)
        diff = float((art.run(name, *fresh) - ref).abs().max())
        if tol is not None and not diff <= tol:
            raise ExportError(f"the {fmt} artifact's {name} mode differs from the eager network by {diff:.3g} "
                              f"(> {tol}); not written")
        meta["modes"][name]["parity_max_abs_diff"] = diff
    meta.update({
        **signature_info(family, [family.mode(n) for n in names]),
        "model_config": {k: getattr(m, k) for k in m.__dataclass_fields__}, "output_range": [-1, 1],
        "inputs": {t.name: [t.dtype, *t.shape] for t in family.mode(names[0]).inputs},  # the default mode's, as format 1
        "step": loaded.step, "source": str(loaded.source), "label": loaded.label, "run": str(Path(run_dir)),
        "metrics": run_metrics(run_dir, loaded.label, loaded.step),
        "parity_max_abs_diff": max(meta["modes"][n]["parity_max_abs_diff"] for n in names),
        "parity_tolerance": tol, "parity_batch": 7,
        **({"calibration": CALIBRATION} if quantize == "int8-static" else {})})
    write_json_atomic(out / ARTIFACT_JSON, meta)
    return meta


def signature_info(family, modes) -> dict:
    """What artifact.json and the server's /info say about a family's network with ``modes`` (gan.family.Mode,
    the default first): family, model name, image shape (the default mode's output), and ``z_dim`` /
    ``num_classes`` + ``class_names`` (of the run's shards) only where a mode takes noise / a class."""
    m = family.cfg.model
    out = {"family": family.name, "model": getattr(m, "name", family.name), "image_shape": list(modes[0].output.shape[1:])}
    noise = next((mode.input("noise") for mode in modes if mode.input("noise")), None)
    if noise:
        out["z_dim"] = int(noise.shape[1])
    if any(mode.input("class") for mode in modes):
        out.update(num_classes=m.num_classes, class_names=class_names(family.cfg.data.shards, m.num_classes))
    return out


def artifact_modes(meta: dict) -> dict:
    """{mode name: gan.family.Mode} of an artifact.json, in order; format 1 (no ``modes``): the GAN's generate."""
    from gan.family import Mode, class_tensor, image_tensor, noise_tensor

    if "modes" not in meta:
        c, h, _ = meta.get("image_shape") or [3, 0, 0]
        return {"generate": Mode("generate", (noise_tensor(int(meta.get("z_dim", 0))), class_tensor()),
                                 image_tensor("images", c, h))}
    try:
        return {name: Mode.from_json(name, d) for name, d in meta["modes"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"artifact.json: its modes are not readable ({e!r}); export again") from None


class Artifact:
    """A loaded artifact: ``artifact.run(mode, *inputs)`` -> float (N, C, H, W) on the CPU; ``artifact(*inputs)``
    runs the default mode (the GAN's ``artifact(z, y)``). ``modes``: {name: gan.family.Mode}. Verifies
    artifact.json and every program file's sha256 before use."""

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
        self.meta, self.format, self.device = meta, fmt, torch.device(device)
        self.modes = artifact_modes(meta)
        self.default = meta.get("mode") or next(iter(self.modes))
        if self.default not in self.modes:
            raise ExportError(f"{d}: {ARTIFACT_JSON} names the default mode {self.default!r}, which it does not list; "
                              f"export again")
        if fmt == "torchscript":
            print(f"warning: {d / str(meta.get('file', ''))} is TorchScript, which torch deprecates; export it again as a "
                  f"torch.export program (the default of launch/export.py)", file=sys.stderr, flush=True)
        self._runners = {}
        for name in self.modes:
            entry = meta if name == self.default else meta["modes"][name]  # the default mode's file is top-level
            path = d / str(entry.get("file", ""))
            if not path.is_file():
                raise ExportError(f"{d}: the model file {path.name!r} named in {ARTIFACT_JSON} is missing; export again")
            if expect_sha and entry.get("sha256") != sha256_file(path):
                raise ExportError(f"{path} does not match the sha256 in {ARTIFACT_JSON} (damaged or replaced); "
                                  f"export again")
            self._runners[name] = self._load(path, self.modes[name].inputs, threads)
        self.path = d / str(meta.get("file", ""))

    def _load(self, path: Path, inputs: tuple, threads: int):
        """A callable (*tensors) -> float tensor on the CPU, running the program in ``path``."""
        if self.format == "export":
            module = load_program(path, self.device)
        elif self.format == "torchscript":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit.load's own deprecation warning: said above
                    module = torch.jit.load(str(path), map_location=self.device).eval()
            except RuntimeError as e:
                raise ExportError(f"{path} is not a loadable TorchScript file ({str(e).splitlines()[0]})") from None
        else:
            import onnxruntime as ort

            providers = (["CUDAExecutionProvider"] if self.device.type == "cuda" else []) + ["CPUExecutionProvider"]
            try:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads  # 0 = onnxruntime's default (all cores)
                session = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # noqa: BLE001 (onnxruntime raises its own exception types)
                raise ExportError(f"{path} is not a loadable ONNX model ({e})") from None
            feed = [(t.name, getattr(torch, t.dtype)) for t in inputs]
            return lambda *xs: torch.from_numpy(session.run(None, {n: x.to(dt).cpu().numpy()
                                                                   for (n, dt), x in zip(feed, xs)})[0])
        return lambda *xs: module(*(x.to(self.device) for x in xs)).float().cpu()

    @torch.no_grad()
    def run(self, mode: str, *inputs: torch.Tensor) -> torch.Tensor:
        if mode not in self._runners:
            raise ExportError(f"this artifact has no {mode!r} mode; its modes: {', '.join(self.modes)}")
        return self._runners[mode](*inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(self.default, *inputs)
