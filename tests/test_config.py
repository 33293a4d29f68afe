"""Config: defaults < YAML < overrides, and every error names the key before work starts."""
import subprocess
import sys
from pathlib import Path

import pytest

from gan.config import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_defaults_yaml_cli(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr_d: 1.0e-3\n  lr_g: 1.0e-3\ntrain:\n  seed: 5\n")
    (tmp_path / "exp.yaml").write_text("base: base.yaml\noptim:\n  lr_g: 3.0e-4\n")
    cfg = load_config(tmp_path / "exp.yaml", ["optim.lr_d=1e-4", "train.batch_size=16"])
    assert cfg.optim.lr_d == 1e-4  # CLI beats YAML
    assert cfg.optim.lr_g == 3e-4  # experiment beats base
    assert cfg.train.seed == 5  # base beats default
    assert cfg.optim.betas_d == Config().optim.betas_d  # default
    assert cfg.train.batch_size == 16


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.train.max_steps >= 1


def test_required_keys_exist():
    cfg = load_config(ROOT / "configs/debug_cpu.yaml",
                      ["data.shards=/x", "train.max_steps=3", "train.batch_size=4", "train.seed=1", "checkpoint.every=2"])
    assert (cfg.data.shards, cfg.train.max_steps, cfg.train.batch_size, cfg.train.seed, cfg.checkpoint.every) == ("/x", 3, 4, 1, 2)


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lr_dd'.*Did you mean: optim.lr_d"):
        load_config(None, ["optim.lr_dd=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optm'.*Did you mean: optim"):
        load_config(None, ["optm.lr_d=1e-4"])


def test_unknown_key_in_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match="train.max_step.*train.max_steps"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("data.hflip=3", "data.hflip"),
    ("optim.lr_d=fast", "optim.lr_d"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}' must be of type"):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("optim.lr_d=-1", "optim.lr_d"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("optim.n_dis=0", "optim.n_dis"),
    ("model.img_size=30", "model.img_size"),
    ("checkpoint.every=0", "checkpoint.every"),
])
def test_invalid_value_names_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_section_given_scalar():
    with pytest.raises(ConfigError, match="'optim' is a section"):
        load_config(None, ["optim=3"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_override_syntax():
    parsed = parse_overrides(["a.b=1", "a.c=x", "d=true"])
    assert (parsed["a"]["b"].parsed, parsed["a"]["c"].parsed, parsed["d"].parsed) == (1, "x", True)
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["optim.lr_d"])


def test_yaml_booleans_stay_strings_for_string_keys(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["data.hflip=no"]).data.hflip is False  # a real bool key still reads YAML
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError, match="quote the value"):
        load_config(tmp_path / "c.yaml")


def test_int_accepted_for_float_and_roundtrip():
    cfg = load_config(None, ["optim.lr_d=1"])
    assert isinstance(cfg.optim.lr_d, float)
    import yaml
    assert load_config(None, []).to_dict() == Config().to_dict()
    assert yaml.safe_load(cfg.to_yaml())["optim"]["lr_d"] == 1.0


def _train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_dry_run_prints_resolved_config():
    r = _train("--config", "configs/debug_cpu.yaml", "--dry-run", "optim.lr_d=5e-5")
    assert r.returncode == 0, r.stderr
    import yaml
    printed = yaml.safe_load(r.stdout)
    assert printed["optim"]["lr_d"] == 5e-5 and printed["model"]["g_channels"] == 8


def test_cli_config_error_exits_2_before_work(tmp_path):
    r = _train("--config", "configs/debug_cpu.yaml", "--run-dir", str(tmp_path / "run"), "optim.lr_dd=1")
    assert r.returncode == 2 and "optim.lr_d" in r.stderr
    assert not (tmp_path / "run").exists()
    r = _train("--config", "configs/missing.yaml", "--dry-run")
    assert r.returncode == 2 and "config file not found" in r.stderr
