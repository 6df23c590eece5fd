"""bench/train_profile.py runs on tiny data and prints its phase tables and operator profile (no timings)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tiny import ROOT, make_data, write_yaml

sys.path.insert(0, str(ROOT / "bench"))

import train_profile


def test_profile_prints_phases_for_both_precisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_data(tmp_path, output_dir=str(tmp_path / "output"))
    config = write_yaml(cfg, tmp_path / "cfg.yaml")
    argv = ["--config", str(config), "--images", "8", "--steps", "2", "--warmup", "1", "--profile-steps", "1"]
    assert train_profile.main([*argv, "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "CPU: " in out and "avx512_bf16" in out
    assert "== bfloat16 (precision bf16)" in out and "== fp32 (precision fp32)" in out
    for phase in train_profile.PHASES:
        assert out.count(f"\n{phase} ") == 2, phase
    assert out.count("torch.profiler, 1 step(s)") == 2 and "depthwise ones" in out
    assert out.count("step totals, ms: ") == 2 and "images/s" in out
