"""Trackers through Accelerate's tracker API: TensorBoard (read back, hparams plugin included) and
MLflow's local file store, exercised by one real training run; bad tracker names."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import train_debug as train

mlflow_missing = importlib.util.find_spec("mlflow") is None


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_shards):
    d = tmp_path_factory.mktemp("tracked")
    env = {"MLFLOW_TRACKING_URI": (d / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    run = d / "run"
    train(run, tiny_shards, "train.max_steps=4", "log.every=2", "log.sample_every=4", "checkpoint.every=4",
          f"log.with={'tensorboard' if mlflow_missing else 'tensorboard,mlflow'}", "log.project=trackers-test",
          env=env)
    return run, env


def test_tensorboard_scalars_images_config_and_hparams(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, _ = tracked_run
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    assert [e.step for e in ea.Scalars("Loss/D/main")] == [2, 4]
    assert [e.step for e in ea.Images("Samples/ema")] == [4]
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 4" in text and "with: tensorboard" in text
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr_g"].number_value == pytest.approx(2e-4)
    assert start.hparams["data.shards"].string_value.endswith("shards")
    assert start.hparams["optim.betas_g"].string_value == "[0.5, 0.999]"
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} >= {"Loss/D/main", "Loss/G/main"}  # shown beside the hparams


@pytest.mark.skipif(mlflow_missing, reason="mlflow is not installed (pip install mlflow-skinny; it is in .[test])")
def test_mlflow_local_file_store(tracked_run):
    import mlflow

    run, env = tracked_run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("trackers-test")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == run.name and r.info.status == "FINISHED"
    assert r.data.params["optim.lr_g"] == "0.0002" and r.data.params["train.max_steps"] == "4"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "Loss/G/main")] == [2, 4]
    assert "config.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)}
    config = client.download_artifacts(r.info.run_id, "config.yaml", str(run.parent / "dl"))
    assert "max_steps: 4" in open(config).read()
    images = [a.path for a in client.list_artifacts(r.info.run_id, "images")]
    assert any("Samples_ema+step+4" in p and p.endswith(".png") for p in images)


def test_bad_tracker_names(tmp_path, tiny_shards):
    r = train(tmp_path / "a", tiny_shards, "log.with=tensorbord", check=False)
    assert r.returncode == 2 and "log.with" in r.stderr and "tensorbord" in r.stderr
    missing = next((n for n in ("aim", "wandb") if importlib.util.find_spec(n) is None), None)
    if missing:
        r = train(tmp_path / "b", tiny_shards, f"log.with=tensorboard,{missing}", check=False)
        assert r.returncode == 2 and f"pip install {missing}" in r.stderr and "log.with=tensorboard" in r.stderr
        assert not (tmp_path / "b" / "checkpoints").exists()


def test_no_trackers(tmp_path, tiny_shards):
    run = tmp_path / "quiet"
    train(run, tiny_shards, "train.max_steps=2", "log.with=")  # empty: no trackers
    assert not list(run.glob("events.out.tfevents.*"))
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2]
