"""The config contract: defaults < YAML < flags, every key a flag, clear errors, saved config round-trips."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lib.config import GROUPS, STAGES, Config, ConfigError, load_config, parse_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_defaults_yaml_flags(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text("resize: 128\nn_folds: 3\nletterbox: true\n")
    cfg, _ = parse_config(["--config", str(yml), "--n-folds", "4"], stage="folds")
    assert cfg.resize == 128  # from YAML
    assert cfg.n_folds == 4  # flag beats YAML
    assert cfg.letterbox is True
    assert cfg.seed == Config().seed  # default
    cfg, _ = parse_config(["--config", str(yml), "--no-letterbox"], stage="folds")
    assert cfg.letterbox is False


@pytest.mark.parametrize("stage", ["resize", "distill", "stack"])
def test_each_stage_help_lists_exactly_the_keys_it_reads(stage: str) -> None:
    out = subprocess.run(
        [sys.executable, f"src/{stage}.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    offered = {n for g in STAGES[stage] for n in GROUPS[g]}
    for f in dataclasses.fields(Config):
        assert (f"--{f.name.replace('_', '-')} " in out) == (f.name in offered), f.name
    if stage == "resize":
        assert "xgb" not in out and "--stacker" not in out


def test_every_key_is_read_by_some_stage_and_in_one_group() -> None:
    grouped = [n for names in GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(Config))
    assert {g for groups in STAGES.values() for g in groups} == set(GROUPS)


def test_unknown_yaml_key_names_the_close_match(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text("n_fold: 3\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(yml)], stage="folds")
    with pytest.raises(ConfigError, match=r"n_fold.*did you mean n_folds"):
        load_config(yml)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("resize: big\n", "resize.*must be int"),
        ("n_folds: 1\n", "n_folds must be at least 2"),
        ("image_format: gif\n", "image_format"),
        ("- a\n- b\n", "mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_values_are_refused(tmp_path: Path, text: str, match: str) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(yml)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = Config(resize=96, exp="x", letterbox=True)
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg


def test_shipped_configs_load() -> None:
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/ should hold at least demo.yaml"
    for path in files:
        load_config(path)


def test_the_stamps_check_runs_the_demo_recipe_unchanged() -> None:
    """configs/stamps_default.yaml is README's check that the default is not tuned to ELPV: only where the data
    lives, its resize, the predict time limit and the published anchor may differ from configs/demo.yaml."""
    data_keys = {
        "exp", "train_csv", "train_images", "folds_csv", "test_images", "test_labels", "output_dir",
        "bundle_dir", "submission", "resize", "time_limit", "anchor_name", "anchor_accuracy",
    }  # fmt: skip
    demo = dataclasses.asdict(load_config(ROOT / "configs" / "demo.yaml"))
    stamps = dataclasses.asdict(load_config(ROOT / "configs" / "stamps_default.yaml"))
    differ = {k for k in demo if demo[k] != stamps[k]}
    assert differ - data_keys == set()
    assert {"exp", "train_csv", "resize"} <= differ
