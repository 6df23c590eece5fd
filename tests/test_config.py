"""The config contract: defaults < YAML < flags, every key a flag, clear errors, saved config round-trips."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from config import Config, ConfigError, load_config, parse_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_defaults_yaml_flags(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text("resize: 128\nn_folds: 3\nletterbox: true\n")
    cfg, _ = parse_config(["--config", str(yml), "--n-folds", "4"])
    assert cfg.resize == 128  # from YAML
    assert cfg.n_folds == 4  # flag beats YAML
    assert cfg.letterbox is True
    assert cfg.seed == Config().seed  # default
    cfg, _ = parse_config(["--config", str(yml), "--no-letterbox"])
    assert cfg.letterbox is False


def test_every_key_is_a_flag_listed_in_help() -> None:
    out = subprocess.run(
        [sys.executable, "src/resize.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_unknown_yaml_key_names_the_close_match(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text("n_fold: 3\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(yml)])
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
