"""Export parity (eager vs TorchScript vs ONNX in onnxruntime) and every endpoint of a real server."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, train_debug
from serve_helpers import running_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

# fp32 artifacts vs the eager G: the same float32 arithmetic in another order (ONNX Runtime's kernels; torch.export and
# TorchScript run PyTorch's own). A dot product of n terms reordered moves by ~sqrt(n) * 2^-24 of its terms'
# size (n * 2^-24 at worst); with n <= ~1e3 per output and <= ~12 layers into a tanh (values in [-1, 1]) that
# is ~2e-5, and 1e-4 leaves a factor of 4 over it. Measured (parity_max_abs_diff of every artifact of
# tests/test_serve.py and tests/test_serve_families.py): 0 for torch.export and TorchScript, at most 7.7e-7
# for ONNX under the default CPU kernels and 9.1e-7 under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
TOL = 1e-4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_shards):
    run = tmp_path_factory.mktemp("serve") / "run"
    train_debug(run, tiny_shards, "train.max_steps=5")
    return run


@pytest.fixture(scope="module")
def artifacts(run_dir, tmp_path_factory):
    from gan.export import export

    out = tmp_path_factory.mktemp("artifacts")
    return {f: (out / f, export(run_dir, out / f, f)) for f in ("export", "onnx", "torchscript")}


def eager(run_dir):
    from gan.export import bake
    from gan.metrics import load_generator

    return bake(load_generator(run_dir, run_dir / "export" / "G_ema.safetensors").G)


@pytest.mark.numerics
def test_export_parity_and_metadata(run_dir, artifacts):
    from gan.export import Artifact

    G = eager(run_dir)
    for n in (1, 13):  # other batch sizes than the trace/export used
        z, y = torch.randn(n, G.z_dim), torch.arange(n) % 10
        ref = G(z, y)
        for fmt, (d, meta) in artifacts.items():
            assert meta["parity_max_abs_diff"] <= TOL
            got = Artifact(d)(z, y)
            assert got.shape == ref.shape == (n, 3, 32, 32)
            assert (got - ref).abs().max().item() <= TOL, fmt
    meta = artifacts["onnx"][1]
    assert meta["class_names"] == [f"class{k}" for k in range(10)]
    assert meta["z_dim"] == G.z_dim and meta["image_shape"] == [3, 32, 32] and meta["step"] == 5


def test_an_artifact_exported_after_evaluation_carries_its_metrics(run_dir, artifacts, tmp_path):
    """launch/evaluate.py measures the newest checkpoint by default ("step-00000005" in RUN/metrics.json);
    RUN/export/ holds that checkpoint's EMA G, so an artifact exported after it carries those metrics. One
    exported before the evaluation keeps what the run had then (none)."""
    import shutil

    from gan.export import export
    from gan.metrics import merge_metrics_json

    assert artifacts["export"][1]["metrics"] == {}  # exported before any evaluation
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    merge_metrics_json(run / "metrics.json", "step-00000005", 5, str(run / "checkpoints" / "step-00000005"),
                       {"cls_acc": 0.25, "cls_fd": 3.5}, {"metrics": ["cls_acc", "cls_fd"]})
    merge_metrics_json(run / "metrics.json", "step-00000004", 4, "elsewhere", {"cls_acc": 0.5},
                       {"metrics": ["cls_acc"]})  # another network (another step): not the artifact's
    assert export(run, tmp_path / "a", "torchscript")["metrics"] == {"cls_acc": 0.25, "cls_fd": 3.5}
    assert json.loads((tmp_path / "a" / "artifact.json").read_text())["metrics"] == {"cls_acc": 0.25, "cls_fd": 3.5}


@pytest.mark.numerics
def test_artifacts_load_without_this_package(artifacts, tmp_path):
    """Only torch / onnxruntime + artifact.json: the loaded modules never include gan."""
    script = r"""
import json, sys, numpy as np, torch, onnxruntime as ort
pt2_dir, onnx_dir = sys.argv[1:3]
m = json.load(open(pt2_dir + "/artifact.json"))
z = torch.randn(3, m["z_dim"]); y = torch.tensor([0, 1, 2])
a = torch.export.load(pt2_dir + "/" + m["file"]).module()(z, y)
s = ort.InferenceSession(onnx_dir + "/generator.onnx", providers=["CPUExecutionProvider"])
b = s.run(None, {"z": z.numpy(), "y": y.numpy()})[0]
assert not any(k == "gan" or k.startswith("gan.") for k in sys.modules), "gan was imported"
print(float(abs(a.numpy() - b).max()))
"""
    r = subprocess.run([sys.executable, "-I", "-c", script, str(artifacts["export"][0]), str(artifacts["onnx"][0])],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) <= TOL


def test_int8_export_runs(run_dir, tmp_path):
    from gan.export import Artifact, ExportError, export

    G = eager(run_dir)
    z, y = torch.randn(4, G.z_dim), torch.arange(4)
    for fmt in ("export", "onnx"):
        meta = export(run_dir, tmp_path / fmt, fmt, "int8")
        assert meta["quantize"] == "int8"
        out = Artifact(tmp_path / fmt)(z, y)
        assert torch.isfinite(out).all() and out.shape == (4, 3, 32, 32)
    with pytest.raises(ExportError, match="int8-static needs --format onnx"):
        export(run_dir, tmp_path / "pt2-static", "export", "int8-static")


@pytest.fixture(scope="module")
def biggan_run(tmp_path_factory):
    """A run directory holding a random-init BigGAN generator (no training: its outputs spread over [-1, 1],
    unlike a 5-step run's, so closeness means something) and that G itself."""
    import dataclasses

    import yaml

    from gan.checkpoint import export_generator
    from gan.config import from_dict
    from gan.families.gan.models import build_models

    model = {"name": "biggan", "g_channels": 8, "d_channels": 8, "z_dim": 20, "shared_dim": 16, "hier_z": True,
             "g_spectral_norm": False, "d_spectral_norm": False, "attn_res": 0}
    cfg = from_dict({"model": model}).model
    torch.manual_seed(0)
    G = build_models(cfg)[0].eval()
    run = tmp_path_factory.mktemp("biggan") / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    export_generator(run / "export", G, dataclasses.asdict(cfg), step=1)
    return run, G


def _diff_to_eager(G, artifact_dir):
    from gan.export import Artifact

    z, y = torch.randn(37, G.z_dim), torch.arange(37) % 10
    with torch.no_grad():
        ref = G(z, y)
        out = Artifact(artifact_dir)(z, y)
    assert ref.std().item() > 0.1 and out.dtype == torch.float32  # something to be close to; float32 out
    diff = (out - ref).abs()
    return diff.max().item(), diff.mean().item()


def test_int8_static_onnx_is_quantized_and_close(biggan_run, tmp_path):
    """onnxruntime static int8: the convolutions really run as int8 (QLinearConv, calibrated on the
    generator's own inputs), and the images stay close to the eager fp32 G's (trained models:
    docs/benchmarks.md)."""
    import onnx

    from gan.export import export

    run, G = biggan_run
    meta = export(run, tmp_path / "s", "onnx", "int8-static")
    assert meta["quantize"] == "int8-static" and meta["calibration"]["batches"] > 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "s" / meta["file"])).graph.node}
    assert {"QuantizeLinear", "QLinearConv"} <= ops and "Conv" not in ops, ops
    mx, mean = _diff_to_eager(G, tmp_path / "s")
    # a coarse guard of image quality, not a rounding bound: int8 activations are quantized in steps of
    # their calibrated range / 255 at every layer; trained models: docs/benchmarks.md
    assert mx < 0.5 and mean < 0.05, (mx, mean)


def test_bf16_program_runs_in_bf16_and_stays_close(biggan_run, tmp_path):
    """--quantize bf16: the exported graph keeps the autocast casts (the images differ from fp32 by bf16
    rounding, not by 0) and stay close; ONNX bf16 is refused with the reason."""
    from gan.export import ExportError, export

    run, G = biggan_run
    meta = export(run, tmp_path / "b", quantize="bf16")
    assert meta["quantize"] == "bf16"
    mx, mean = _diff_to_eager(G, tmp_path / "b")
    # bf16 rounds by up to 2^-8 relative per op (fp32 would give <= 1e-6: TOL's measurement), so > 1e-4
    # shows that bf16 ran; the upper bounds are a coarse guard of image quality (values in [-1, 1])
    assert 1e-4 < mx < 0.25 and mean < 0.02, (mx, mean)
    with pytest.raises(ExportError, match="bf16 needs --format export or torchscript"):
        export(run, tmp_path / "o", "onnx", "bf16")


def test_export_cli_errors(run_dir, tmp_path):
    cli = [sys.executable, "launch/export.py", "--format", "onnx", "--out", str(tmp_path / "x")]
    r = subprocess.run(cli + ["--run", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "run directory not found" in r.stderr
    r = subprocess.run(cli + ["--run", str(run_dir), "--best"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "best/G_ema.safetensors" in r.stderr
    r = subprocess.run(cli + ["--run", str(run_dir), "--quantize", "bf16"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "bf16 needs --format export or torchscript" in r.stderr and not (tmp_path / "x").exists()


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def test_png_bytes_round_trips_pixels():
    import numpy as np
    from PIL import Image

    from gan.serve.app import png_bytes
    from gan.viz import to_uint8

    for c in (1, 3):
        img = torch.rand(c, 10, 7) * 2 - 1
        dec = torch.from_numpy(np.array(Image.open(io.BytesIO(png_bytes(img)))))
        dec = dec[None] if c == 1 else dec.permute(2, 0, 1)
        assert torch.equal(dec, to_uint8(img))


async def _post_many(url, bodies, accept="image/png"):
    async with httpx.AsyncClient(timeout=300) as c:
        return await asyncio.gather(*[c.post(url + "/generate", json=b, headers={"Accept": accept}) for b in bodies])


@pytest.mark.slow
def test_endpoints_batching_and_bad_input(artifacts):
    with running_server("--artifact", str(artifacts["export"][0]), "--max-batch", "64", "--max-wait-ms", "50") as url:
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        info = httpx.get(url + "/info").json()
        assert info["classes"][3] == {"index": 3, "name": "class3"} and info["step"] == 5
        assert httpx.get(url + "/docs").status_code == 200 and "/generate" in httpx.get(url + "/openapi.json").text
        assert "<select" in httpx.get(url + "/").text
        r = httpx.post(url + "/generate", json={"class": "class2", "n": 10, "seed": 7}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert png_size(r.content) == (8 * 34 + 2, 2 * 34 + 2)  # 8 per row, 2 px padding
        j = httpx.post(url + "/generate", json={"class": 2, "n": 3, "seed": 7},
                       headers={"Accept": "application/json"}, timeout=120).json()
        assert j["class_name"] == "class2" and len(j["images"]) == 3
        assert png_size(base64.b64decode(j["images"][0])) == (32, 32)
        alone = j["images"]
        # same seed and class -> same images, also when batched with 31 other requests
        bodies = [{"class": k % 10, "n": 1 + k % 3, "seed": 1000 + k} for k in range(31)] + [{"class": 2, "n": 3, "seed": 7}]
        rs = asyncio.run(_post_many(url, bodies, "application/json"))
        assert [r.status_code for r in rs] == [200] * 32
        assert rs[-1].json()["images"] == alone
        assert [len(r.json()["images"]) for r in rs] == [b["n"] for b in bodies]
        sizes = {int(k): v for k, v in httpx.get(url + "/info").json()["batching"]["batch_sizes"].items()}
        assert max(sizes) > 3, sizes  # requests shared forward passes (larger than any single request)
        assert httpx.post(url + "/generate", json={"class": 1, "n": 2}).headers["x-seed"].isdigit()
        # bad input: 4xx naming the field and the allowed values
        for body, field in [({"class": "dragon"}, "class"), ({"class": 10}, "class"), ({"class": 0, "n": 0}, "n"),
                            ({"class": 0, "n": 65}, "n"), ({"class": 0, "seed": -1}, "seed"),
                            ({"class": 0, "truncation": 9}, "truncation"), ({"class": 0, "colour": 1}, "colour")]:
            r = httpx.post(url + "/generate", json=body)
            assert r.status_code == 422, (body, r.text)
            d = r.json()["detail"][0]
            assert d["field"] == field and d["allowed"], (body, d)
        r = httpx.post(url + "/generate", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["detail"][0]["message"]
        assert httpx.get(url + "/health").status_code == 200


def test_dynamic_int8_is_served_one_forward_pass_per_request(run_dir, tmp_path):
    """Dynamic int8 quantizes activations with a scale taken from the whole batch, so an image would depend
    on the requests it shares a forward pass with: such an artifact is served one forward pass per request
    (said in /info), and the same seed gives the same images amid concurrent requests."""
    from gan.export import export

    export(run_dir, tmp_path / "int8", quantize="int8")
    with running_server("--artifact", str(tmp_path / "int8"), "--max-batch", "64", "--max-wait-ms", "200") as url:
        batching = httpx.get(url + "/info").json()["batching"]
        assert batching["max_batch"] == 0 and "dynamic int8" in batching["note"], batching
        body = {"class": 2, "n": 3, "seed": 7}
        alone = httpx.post(url + "/generate", json=body, headers={"Accept": "application/json"}, timeout=120).json()
        bodies = [{"class": k % 10, "n": 1 + k % 2, "seed": 100 + k} for k in range(15)] + [body]
        rs = asyncio.run(_post_many(url, bodies, "application/json"))
        assert [r.status_code for r in rs] == [200] * 16
        assert rs[-1].json()["images"] == alone["images"]
        sizes = {int(k) for k in httpx.get(url + "/metrics").json()["batch_sizes"]}
        assert sizes <= {1, 2, 3}, sizes  # never two requests in one forward pass


@pytest.mark.slow
def test_full_queue_answers_503_and_recovers(artifacts):
    with running_server("--artifact", str(artifacts["onnx"][0]), "--max-batch", "0", "--max-queue", "2") as url:
        rs = asyncio.run(_post_many(url, [{"class": 0, "n": 64, "seed": k} for k in range(24)]))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
        stats = httpx.get(url + "/metrics").json()
        assert stats["rejected"] == codes.count(503) and set(stats["batch_sizes"]) == {"64"}
        assert httpx.post(url + "/generate", json={"class": 0}, timeout=120).status_code == 200


def test_startup_errors_before_binding(run_dir, tmp_path, artifacts):
    def serve(*args):
        return subprocess.run([sys.executable, "launch/serve.py", *args, "--port", "1"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    r = serve("--artifact", str(tmp_path / "missing"))
    assert r.returncode == 2 and "artifact directory not found" in r.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    r = serve("--run", str(bare))
    assert r.returncode == 2 and "no export/G_ema.safetensors yet" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((artifacts["onnx"][0] / "artifact.json").read_text())
    (other / "artifact.json").write_text(json.dumps({**meta, "format": "tflite"}))
    r = serve("--artifact", str(other))
    assert r.returncode == 2 and "format 'tflite'" in r.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "artifact.json").write_text(json.dumps(meta))
    data = (artifacts["onnx"][0] / "generator.onnx").read_bytes()
    (damaged / "generator.onnx").write_bytes(data[: len(data) // 2])
    r = serve("--artifact", str(damaged))
    assert r.returncode == 2 and "sha256" in r.stderr


def test_bake_spectral_norm_biggan_matches_eager():
    """BigGAN with spectral norm in G: the baked copy computes what the eval-mode G computes."""
    from gan.config import from_dict
    from gan.export import bake
    from gan.families.gan.models import build_models

    cfg = from_dict({"model": {"name": "biggan", "g_channels": 8, "d_channels": 8, "z_dim": 20, "shared_dim": 16,
                               "hier_z": True, "g_spectral_norm": True}}).model
    G = build_models(cfg)[0].eval()
    z, y = torch.randn(3, 20), torch.arange(3)
    with torch.no_grad():
        ref = G(z, y)
        baked = bake(G)
        assert not any(hasattr(m, "parametrizations") for m in baked.modules())
        # the baked weight is W / sigma computed once, the eager one every forward: the same float32 ops, in
        # another order at most (~2^-24 relative per op into a tanh)
        assert (baked(z, y) - ref).abs().max().item() <= 1e-5


def test_batcher_finishes_each_request_in_its_thread_off_the_event_loop():
    """One forward pass for concurrent requests; each request's ``finish`` (the app's PNG encoding) runs on
    that request's own images in the batcher's thread, not on the event loop; a failing finish fails only
    its own request."""
    import threading

    from gan.serve.batcher import Batcher

    seen = []

    def model(z, y):
        seen.append(("forward", threading.get_ident(), len(z)))
        return z * 2

    def finish(tag):
        def f(images):
            seen.append(("finish", threading.get_ident(), tag))
            if tag == "bad":
                raise ValueError("cannot encode")
            return (tag, images.tolist())
        return f

    async def main():
        b = Batcher(model, max_batch=64, max_wait_ms=10_000, max_queue=8)
        b.start()
        try:
            zs = [torch.full((n, 1), float(n)) for n in (1, 2, 3)]
            tags = ["a", "bad", "c"]
            ys = [torch.zeros(len(z), dtype=torch.long) for z in zs]
            # 6 images: the batch closes when max_batch would overflow, so send a 4th that does not fit
            tasks = [asyncio.create_task(b.submit(z, y, finish(t))) for z, y, t in zip(zs, ys, tags)]
            tasks.append(asyncio.create_task(b.submit(torch.ones(60, 1), torch.zeros(60, dtype=torch.long))))
            res = await asyncio.gather(*tasks, return_exceptions=True)
            return threading.get_ident(), res, b.stats()
        finally:
            await b.stop()

    loop_thread, res, stats = asyncio.run(main())
    assert res[0] == ("a", [[2.0]]) and res[2] == ("c", [[6.0]] * 3)
    assert isinstance(res[1], ValueError) and "cannot encode" in str(res[1])
    assert torch.equal(res[3], torch.full((60, 1), 2.0))  # no finish: the images themselves
    assert stats["batch_sizes"] == {"6": 1, "60": 1} and stats["forward_passes"] == 2
    forward_threads = {t for kind, t, _ in seen if kind == "forward"}
    finish_threads = {t for kind, t, _ in seen if kind == "finish"}
    assert len(forward_threads) == len(finish_threads) == 1 and loop_thread not in forward_threads | finish_threads
    assert [s[2] for s in seen if s[0] == "finish"] == ["a", "bad", "c"]


def test_batcher_encodes_one_batch_while_the_next_runs_forward():
    """Pipelining: the finish (encoding) of batch 1 waits until batch 2's forward pass has started; that
    only completes if encoding and forward passes run in different threads (no timing is asserted: the
    wait is a condition, with a generous limit for the failing case)."""
    import threading

    from gan.serve.batcher import Batcher

    second_forward = threading.Event()

    def model(z, y):
        if z[0, 0] == 2:
            second_forward.set()
        return z

    def wait_for_second(images):
        return second_forward.wait(60)

    async def main():
        b = Batcher(model, max_batch=1, max_wait_ms=1, max_queue=8)
        b.start()
        try:
            first = asyncio.create_task(b.submit(torch.ones(1, 1), torch.zeros(1, dtype=torch.long), wait_for_second))
            second = asyncio.create_task(b.submit(torch.full((1, 1), 2.0), torch.zeros(1, dtype=torch.long)))
            return await first, await second
        finally:
            await b.stop()

    overlapped, second = asyncio.run(main())
    assert overlapped is True and second.item() == 2.0


def _rewrite_pt2(src: Path, dst: Path, edit) -> None:
    """A copy of a .pt2 archive with its model.json passed through ``edit`` (a dict -> dict)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/models/model.json"):
                data = json.dumps(edit(json.loads(data))).encode()
            zout.writestr(item, data)


def test_old_and_wrong_program_files_are_clear_errors(artifacts, tmp_path):
    """A .pt2 from an older export schema, and a TorchScript file where a .pt2 is expected: exit 2 from the
    server before it binds, one line naming the file and the fix, no traceback (torch's loader would log
    one before raising). A TorchScript artifact still loads and is served, with one line saying it is
    deprecated."""
    from gan.io import sha256_file

    src, meta = artifacts["export"]

    def artifact(name, model_file):
        d = tmp_path / name
        d.mkdir()
        (d / "artifact.json").write_text(json.dumps({**meta, "sha256": sha256_file(model_file), "file": model_file.name}))
        return d

    old = tmp_path / "generator.pt2"
    _rewrite_pt2(src / meta["file"], old, lambda j: {**j, "schema_version": {"major": j["schema_version"]["major"] - 1,
                                                                              "minor": 0}, "torch_version": "2.4.0"})
    (tmp_path / "ts.pt").write_bytes((artifacts["torchscript"][0] / "generator.pt").read_bytes())
    cases = [(artifact("old", old), "was written by torch 2.4.0 with export schema"),
             (artifact("ts-as-pt2", tmp_path / "ts.pt"), "is a TorchScript file, not a torch.export program")]
    old.rename(tmp_path / "old" / old.name)
    (tmp_path / "ts.pt").rename(tmp_path / "ts-as-pt2" / "ts.pt")
    for d, words in cases:
        r = subprocess.run([sys.executable, "launch/serve.py", "--artifact", str(d), "--port", "1"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and "launch/export.py" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
    ts = artifacts["torchscript"][0]
    r = subprocess.run([sys.executable, "-c", "import sys, torch; from gan.export import Artifact; "
                        f"print(Artifact(sys.argv[1])(torch.randn(2, {meta['z_dim']}), torch.tensor([0, 1])).shape)",
                        str(ts)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "torch.Size([2, 3, 32, 32])" in r.stdout, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]  # torch's own deprecation warnings are not shown too
    assert len(lines) == 1 and "is TorchScript, which torch deprecates" in lines[0], r.stderr
