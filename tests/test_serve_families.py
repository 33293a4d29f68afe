"""Export and serving of the VAE and pix2pix, on 2-step runs of their recipes (configs/cifar10_vae.yaml, a
class-conditional decoder; configs/cifar10_sketch_pix2pix.yaml, 1-channel sketches to 3-channel photos):

- every format that applies is written, reloads, and matches the eager network per mode, at other batch
  sizes than the export used; int8-static is refused for the modes that take images;
- real servers (--run and --artifact) answer POST /generate and /reconstruct (the VAE) and /translate
  (pix2pix) with the eager network's images; /info lists the family and its modes;
- every bad upload is a 4xx naming the reason before any model work (the batcher counts no request).
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from serve_helpers import pix2pix_run, png, running_server, sketch_pairs, vae_run

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

# fp32 programs vs the eager network: the same float32 arithmetic in another order (ONNX Runtime's kernels; torch.export and
# TorchScript run PyTorch's own). A dot product of n terms reordered moves by ~sqrt(n) * 2^-24 of its terms'
# size (n * 2^-24 at worst); with n <= ~1e3 per output and <= ~12 layers into a tanh (values in [-1, 1]) that
# is ~2e-5, and 1e-4 leaves a factor of 4 over it. Measured (parity_max_abs_diff of every artifact of
# tests/test_serve.py and tests/test_serve_families.py): 0 for torch.export and TorchScript, at most 7.7e-7
# for ONNX under the default CPU kernels and 9.1e-7 under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
TOL = 1e-4


@pytest.fixture(scope="module")
def vae(tmp_path_factory, tiny_shards):
    return vae_run(tmp_path_factory.mktemp("vae") / "run", tiny_shards)


@pytest.fixture(scope="module")
def p2p(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2p")
    return pix2pix_run(root / "run", sketch_pairs(root))


def eager(run):
    """(family, {mode: eager forward}) of a run's exported EMA network."""
    from gan.export import bake
    from gan.metrics import load_generator

    loaded = load_generator(run, next((run / "export").glob("*_ema.safetensors")))
    net = bake(loaded.G)
    return loaded.family, {m.name: loaded.family.mode_forward(net, m.name) for m in loaded.family.modes()}


def u8(images: torch.Tensor) -> torch.Tensor:
    from gan.viz import to_uint8

    return to_uint8(images)


def decode_png(data: bytes) -> torch.Tensor:
    from PIL import Image

    a = torch.from_numpy(np.array(Image.open(io.BytesIO(data))))
    return a[None] if a.ndim == 2 else a.permute(2, 0, 1)


def export_cli(run, out, *args):
    return subprocess.run([sys.executable, "launch/export.py", "--run", str(run), "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("which,modes,files", [
    ("vae", ["generate", "reconstruct"], {"export": ["generator.pt2", "reconstruct.pt2"],
                                          "onnx": ["generator.onnx", "reconstruct.onnx"],
                                          "torchscript": ["generator.pt", "reconstruct.pt"]}),
    ("p2p", ["translate"], {"export": ["translate.pt2"], "onnx": ["translate.onnx"], "torchscript": ["translate.pt"]}),
])
@pytest.mark.numerics
def test_every_format_reloads_with_parity_per_mode(request, tmp_path, which, modes, files):
    """launch/export.py in each format: one program per mode, artifact.json listing family, modes, inputs
    and output with the measured parity; reloaded, each mode matches the eager network at batch sizes 1 and 5."""
    from gan.export import Artifact

    run = request.getfixturevalue(which)
    family, forward = eager(run)
    for fmt, names in files.items():
        out = tmp_path / fmt
        r = export_cli(run, out, "--format", fmt)
        assert r.returncode == 0, r.stderr
        printed = json.loads(r.stdout.splitlines()[0])
        assert printed["family"] == family.name and list(printed["modes"]) == modes
        meta = json.loads((out / "artifact.json").read_text())
        assert sorted(p.name for p in out.iterdir()) == sorted(["artifact.json", *names])
        assert (meta["family"], meta["format"], meta["mode"], meta["file"]) == (family.name, fmt, modes[0], names[0])
        assert list(meta["modes"]) == modes
        for name, entry in meta["modes"].items():
            assert entry["parity_max_abs_diff"] <= TOL and entry["output"]["shape"] == ["N", 3, 32, 32]
            assert entry["inputs"] == family.mode(name).to_json()["inputs"]
        art = Artifact(out)
        for name in modes:
            for n in (1, 5):
                x = family.mode_inputs(name, n, seed=3)
                with torch.no_grad():
                    ref = forward[name](*x)
                got = art.run(name, *x)
                assert got.shape == ref.shape == (n, 3, 32, 32)
                assert (got - ref).abs().max().item() <= TOL, (fmt, name, n)


def test_signatures_of_the_families():
    """The VAE's modes take a class (used by a conditional decoder, 'unused' otherwise), pix2pix's an image of
    model.in_channels; the GAN keeps its (z, class) generate."""
    from gan.config import load_config
    from gan.family import build_family

    def sig(*overrides):
        f = build_family(load_config(None, list(overrides)))
        return {m.name: [(t.name, t.kind, list(t.shape)) for t in m.inputs] for m in f.modes()}

    assert sig() == {"generate": [("z", "noise", ["N", 100]), ("y", "class", ["N"])]}
    assert sig("family=vae", "model.conditional=true") == {
        "generate": [("z", "noise", ["N", 128]), ("y", "class", ["N"])],
        "reconstruct": [("image", "image", ["N", 3, 32, 32]), ("y", "class", ["N"])]}
    assert sig("family=vae", "model.conditional=false")["reconstruct"][1] == ("y", "unused", ["N"])
    assert sig("family=pix2pix", "model.img_size=64", "model.in_channels=1") == {
        "translate": [("image", "image", ["N", 1, 64, 64])]}


def test_quantized_exports_and_what_is_refused(vae, p2p, tmp_path):
    """int8 (dynamic) and bf16 apply to every mode; int8-static calibrates on the network's own inputs, so it is
    refused for modes that take images (naming them) and written for the VAE's generate alone."""
    from gan.export import Artifact

    family, forward = eager(vae)
    r = export_cli(vae, tmp_path / "pt2-int8", "--quantize", "int8")
    assert r.returncode == 2 and "torch.export cannot capture" in r.stderr and "--format onnx" in r.stderr
    for q, fmt in (("int8", "onnx"), ("int8", "torchscript"), ("bf16", "export")):
        r = export_cli(vae, tmp_path / f"{q}-{fmt}", "--quantize", q, "--format", fmt)
        assert r.returncode == 0, r.stderr
        art = Artifact(tmp_path / f"{q}-{fmt}")
        assert art.meta["quantize"] == q
        x = family.mode_inputs("reconstruct", 3, seed=2)
        out = art.run("reconstruct", *x)
        assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all()
        # a coarse guard (values in [-1, 1]): int8 steps of range / 255 per layer, bf16 2^-8 relative per op
        assert (out - forward["reconstruct"](*x)).abs().max() < 0.25
    r = export_cli(p2p, tmp_path / "p2p-static", "--format", "onnx", "--quantize", "int8-static")
    assert r.returncode == 2 and "int8-static" in r.stderr and "translate take images" in r.stderr
    assert not (tmp_path / "p2p-static").exists()
    r = export_cli(vae, tmp_path / "vae-static", "--format", "onnx", "--quantize", "int8-static")
    assert r.returncode == 2 and "reconstruct take images" in r.stderr and "--modes generate" in r.stderr
    r = export_cli(vae, tmp_path / "vae-static", "--format", "onnx", "--quantize", "int8-static", "--modes", "generate")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "vae-static" / "artifact.json").read_text())
    assert list(meta["modes"]) == ["generate"] and meta["calibration"]["batches"] > 0
    r = export_cli(p2p, tmp_path / "x", "--modes", "generate")
    assert r.returncode == 2 and "pix2pix family has no such mode; its modes: translate" in r.stderr


def test_programs_load_without_this_package(vae, p2p, tmp_path):
    """artifact.json + torch / onnxruntime alone run the VAE's reconstruct (.pt2) and pix2pix's translate (ONNX)."""
    from gan.export import export

    export(vae, tmp_path / "vae")
    export(p2p, tmp_path / "p2p", "onnx")
    script = r"""
import json, sys, torch, onnxruntime as ort
vae, p2p = sys.argv[1:3]
m = json.load(open(vae + "/artifact.json"))["modes"]["reconstruct"]
x = torch.rand(3, 3, 32, 32) * 2 - 1
a = torch.export.load(vae + "/" + m["file"]).module()(x, torch.tensor([0, 1, 2]))
p = json.load(open(p2p + "/artifact.json"))
s = ort.InferenceSession(p2p + "/" + p["file"], providers=["CPUExecutionProvider"])
b = s.run(None, {"image": (torch.rand(2, 1, 32, 32) * 2 - 1).numpy()})[0]
assert not any(k == "gan" or k.startswith("gan.") for k in sys.modules), "gan was imported"
print(tuple(a.shape), b.shape)
"""
    r = subprocess.run([sys.executable, "-I", "-c", script, str(tmp_path / "vae"), str(tmp_path / "p2p")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["(3,", "3,", "32,", "32)", "(2,", "3,", "32,", "32)"]


# ---------------------------------------------------------------------------- serving


def rgb32(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def as_input(array: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(array).float() / 127.5 - 1
    return (t[None] if t.ndim == 2 else t.permute(2, 0, 1))[None]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["run", "artifact"])
def test_vae_served_generate_and_reconstruct(vae, tmp_path, source):
    """/info lists the family and both modes; /reconstruct of an uploaded PNG is the eager reconstruction
    (exactly from --run and a .pt2; ONNX within one grey level), also amid concurrent requests of both modes;
    /generate gives the class's prior samples; JSON answers carry base64 PNGs."""
    from gan.export import export

    family, forward = eager(vae)
    args = ["--run", str(vae)]
    if source == "artifact":
        export(vae, tmp_path / "onnx", "onnx")
        args = ["--artifact", str(tmp_path / "onnx")]
    img = rgb32()
    with torch.no_grad():
        want = u8(forward["reconstruct"](as_input(img), torch.tensor([2])))[0]
    slack = 0 if source == "run" else 1
    with running_server(*args, "--max-wait-ms", "50") as url:
        info = httpx.get(url + "/info").json()
        assert info["family"] == "vae" and list(info["modes"]) == ["generate", "reconstruct"]
        assert info["modes"]["reconstruct"]["inputs"][0] == {"name": "image", "dtype": "float32",
                                                             "shape": ["N", 3, 32, 32], "kind": "image"}
        assert "/reconstruct" in httpx.get(url + "/openapi.json").text
        r = httpx.post(url + "/reconstruct", files={"file": ("cat.png", png(img))}, data={"class": "class2"}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        got = decode_png(r.content)
        assert got.shape == (3, 32, 32) and (got.int() - want.int()).abs().max() <= slack
        j = httpx.post(url + "/reconstruct", files={"file": ("cat.png", png(img))}, data={"class": 2},
                       headers={"Accept": "application/json"}, timeout=120).json()
        assert j["mode"] == "reconstruct" and j["class"] == 2 and len(j["images"]) == 1
        assert torch.equal(decode_png(base64.b64decode(j["images"][0])), got)
        g = httpx.post(url + "/generate", json={"class": "class1", "n": 3, "seed": 5},
                       headers={"Accept": "application/json"}, timeout=120).json()
        z, _ = family.mode_inputs("generate", 1)
        from gan.serve.model import latents

        with torch.no_grad():
            gen_want = u8(forward["generate"](latents(3, z.shape[1], 5, None), torch.full((3,), 1)))
        gen = torch.stack([decode_png(base64.b64decode(s)) for s in g["images"]])
        assert g["class_name"] == "class1" and (gen.int() - gen_want.int()).abs().max() <= slack

        async def many():
            async with httpx.AsyncClient(timeout=300) as c:
                recon = [c.post(url + "/reconstruct", files={"file": ("x.png", png(rgb32(k % 3)))},
                                data={"class": k % 10}) for k in range(8)]
                gens = [c.post(url + "/generate", json={"class": k, "n": 2, "seed": k}) for k in range(8)]
                return await asyncio.gather(*recon, *gens)

        import asyncio

        rs = asyncio.run(many())
        assert [x.status_code for x in rs] == [200] * 16
        assert torch.equal(decode_png(rs[2].content), decode_png(httpx.post(
            url + "/reconstruct", files={"file": ("x.png", png(rgb32(2)))}, data={"class": 2}, timeout=120).content))
        stats = httpx.get(url + "/metrics").json()
        assert sum(int(k) * v for k, v in stats["batch_sizes"].items()) == 1 + 1 + 3 + 8 + 16 + 1


@pytest.mark.slow
@pytest.mark.parametrize("source", ["run", "artifact"])
def test_pix2pix_served_translate(p2p, tmp_path, source):
    """POST /translate with a grey sketch answers the eager translation as an RGB PNG; /generate and
    /reconstruct are 404 naming the mode it has; the page offers the upload form, not the generate one."""
    from gan.export import export

    _, forward = eager(p2p)
    args = ["--run", str(p2p)]
    if source == "artifact":
        export(p2p, tmp_path / "pt2")
        args = ["--artifact", str(tmp_path / "pt2")]
    sketch = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    with torch.no_grad():
        want = u8(forward["translate"](as_input(sketch)))[0]
    with running_server(*args) as url:
        info = httpx.get(url + "/info").json()
        assert info["family"] == "pix2pix" and list(info["modes"]) == ["translate"] and info["classes"] == []
        r = httpx.post(url + "/translate", files={"file": ("s.png", png(sketch))}, timeout=120)
        assert r.status_code == 200 and torch.equal(decode_png(r.content), want), r.text
        for mode, body in (("generate", {"json": {"class": 0}}), ("reconstruct", {"files": {"file": ("s.png", png(sketch))}})):
            r = httpx.post(url + f"/{mode}", **body)
            assert r.status_code == 404, r.text
            msg = r.json()["detail"][0]["message"]
            assert f"no '{mode}' mode" in msg and "translate (POST /translate)" in msg
        page = httpx.get(url + "/").text
        assert 'id="upload-form"' in page and 'type="file"' in page


@pytest.mark.slow
def test_bad_uploads_are_4xx_before_any_model_work(p2p, vae):
    """Each refusal names the reason and the fix, and no request reaches the batcher."""
    sketch = np.zeros((32, 32), np.uint8)
    with running_server("--run", str(p2p), "--max-upload-bytes", "20000") as url:
        def post(files=None, **kw):
            return httpx.post(url + "/translate", files=files, timeout=120, **kw)

        cases = [
            (post({"file": ("a.png", b"GIF89a not really")}), 415, "not an image"),
            (post(content=png(sketch), headers={"Content-Type": "image/png"}), 415, "multipart/form-data"),
            (post(json={"file": "a.png"}), 415, "multipart/form-data"),
            (post({"file": ("a.png", b"\0" * 30000)}), 413, "limit of 20000 bytes (--max-upload-bytes)"),
            (post({"file": ("a.png", png(rgb32()))}), 422, "takes 1-channel (grey) images; this one has 3 (RGB"),
            (post({"file": ("a.png", png(np.zeros((32, 32, 4), np.uint8)))}), 422, "this one has 4 (RGBA"),
            (post({"file": ("a.png", png(np.zeros((48, 40), np.uint8)))}), 422, "takes 32x32 images; this one is 40x48"),
            (post({"file": ("a.png", png(np.zeros((4097, 4097), np.uint8)))}, data={"resize": "true"}), 413,
             "over the limit of 16777216"),
            (post({"other": ("a.png", png(sketch))}), 422, "file: Field required"),
            (post({"file": ("a.png", png(sketch))}, data={"class": 1}), 422, "takes no class"),
            (httpx.post(url + "/generate", json={"class": 0, "n": 1}), 404, "has no 'generate' mode"),
        ]
        for r, status, words in cases:
            assert r.status_code == status and words in r.text, (status, words, r.status_code, r.text)
        assert "convert('L')" in cases[4][0].json()["detail"][0]["message"]  # how to convert
        assert "resize=true" in cases[6][0].json()["detail"][0]["message"]
        stats = httpx.get(url + "/metrics").json()
        assert stats["requests"] == stats["forward_passes"] == 0, stats
        r = post({"file": ("a.png", png(np.zeros((48, 40), np.uint8)))}, data={"resize": "true"})
        assert r.status_code == 200 and r.headers["x-resized-from"] == "40x48" and decode_png(r.content).shape == (3, 32, 32)
    with running_server("--run", str(vae)) as url:
        for body, words in (({}, "class: required"), ({"class": "dragon"}, "unknown class name 'dragon'"),
                            ({"class": 10}, "10 is out of range")):
            r = httpx.post(url + "/reconstruct", files={"file": ("a.png", png(rgb32()))}, data=body)
            assert r.status_code == 422 and words in r.text, r.text
        r = httpx.post(url + "/translate", files={"file": ("a.png", png(rgb32()))})
        assert r.status_code == 404 and "generate (POST /generate), reconstruct (POST /reconstruct)" in r.text
        assert httpx.get(url + "/metrics").json()["requests"] == 0
