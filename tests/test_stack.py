"""stack.py (the stacking report stage) on synthetic OOF logits: members are aligned by image name, stack
outputs are never members, mixed folds are refused by name, the CLI's oof.npz is accepted by report.py, and
at many classes top-k members go to the re-ranker, with the report saying which kinds ran and why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_stacker import CLASSES, best_name, complementary_members, layout, swapped_members
from tiny import write_yaml

import report
import stack
from lib import stacker
from lib.config import Config
from lib.layout import STACK_MARKER, read_folds
from lib.oof import TopK, aligned, read_oof, write_oof


def make_cfg(tmp: Path | None = None, **overrides) -> Config:
    """Small, fast XGBoost settings (one thread: the tests must not fight other work for the cores)."""
    settings = {"workers": 1, "seed": 0, "xgb_rounds": 150, "xgb_eta": 0.15, "xgb_early_stop": 15}
    if tmp is not None:
        settings |= {"output_dir": str(tmp / "output"), "folds_csv": str(tmp / "folds.csv")}
    return Config(**(settings | overrides))


def float16(values: np.ndarray) -> np.ndarray:
    """``values`` as the prediction store gives them back (float16, read as float32)."""
    return values.astype(np.float16).astype(np.float32)


def write_folds(root: Path, y: np.ndarray, folds: np.ndarray, classes: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({
        "image": [f"img {i}.png" for i in range(len(y))], "label": np.asarray(classes)[y],
        "group": np.arange(len(y)), "fold": folds,
    })  # fmt: skip
    df.to_csv(root / "folds.csv", index=False)
    return df


def write_member(cfg: Config, name: str, df: pd.DataFrame, logits: np.ndarray, classes: list[str]) -> Path:
    """OOF logits written in a shuffled row order (in the config's store format): stacking must match images
    by name."""
    path = Path(cfg.output_dir) / name / "oof.npz"
    order = np.random.default_rng(len(name)).permutation(len(df))
    write_oof(path, df.iloc[order], logits[order], classes, **cfg.store_options())
    return path


# ---------------------------------------------------------------------------------------------------------
# Members and the command line.


@pytest.fixture
def project(tmp_path: Path) -> tuple[Config, pd.DataFrame, list[np.ndarray]]:
    """folds.csv, members 'a' and 'b' (class-dependent errors), and an older stack output to be skipped."""
    y, folds = layout(4, per=25)
    cfg = make_cfg(tmp_path)
    df = write_folds(tmp_path, y, folds, CLASSES)
    members = swapped_members(y)
    write_member(cfg, "a", df, members[0], CLASSES)
    write_member(cfg, "b", df, members[1], CLASSES)
    old = write_member(cfg, "old_stack", df, members[0], CLASSES)
    (old.parent / STACK_MARKER).write_text("{}")
    return cfg, df, members


def test_load_members_aligns_by_image_name(project) -> None:
    cfg, _, members = project
    assert stack.find_members(cfg) == ["a", "b"]  # old_stack carries stack.json: never a member
    got = stack.read_members(["b", "a"], output_dir=cfg.output_dir, folds=read_folds(cfg.folds_csv), classes=CLASSES)
    np.testing.assert_array_equal(got[0], float16(members[1]))  # the store keeps float16
    np.testing.assert_array_equal(got[1], float16(members[0]))


def test_mixed_folds_are_refused_naming_the_member(project, caplog: pytest.LogCaptureFixture) -> None:
    cfg, df, members = project
    moved = df.copy()
    i, j = df.index[df["fold"] == 0][0], df.index[df["fold"] == 1][0]
    moved.loc[[i, j], "fold"] = moved.loc[[j, i], "fold"].to_numpy()
    write_member(cfg, "stale", moved, members[0], CLASSES)
    with pytest.raises(stack.StackError, match=r"member 'stale' does not share .*another fold id"):
        stack.read_members(["a", "stale"], output_dir=cfg.output_dir, folds=df, classes=CLASSES)
    yaml = write_yaml(
        make_cfg(Path(cfg.folds_csv).parent, stack_members=["a", "stale"]), Path(cfg.output_dir) / "c.yaml"
    )
    assert stack.main(["--config", str(yaml)]) == 2
    assert "member 'stale'" in caplog.text and df.loc[i, "image"] in caplog.text


def test_bad_members_exit_2_with_the_fix(project, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg, _, _ = project
    yaml = write_yaml(make_cfg(tmp_path, stack_members=["a", "ghost"]), tmp_path / "ghost.yaml")
    assert stack.main(["--config", str(yaml)]) == 2
    assert (
        "member 'ghost' has no" in caplog.text
        and "--fold all" in caplog.text
        and "finetune.py" in caplog.text
    )
    empty = write_yaml(make_cfg(tmp_path, output_dir=str(tmp_path / "nothing")), tmp_path / "empty.yaml")
    assert stack.main(["--config", str(empty)]) == 2
    assert "no experiment with an oof.npz" in caplog.text
    (tmp_path / "output" / "stack").mkdir()
    (tmp_path / "output" / "stack" / "fold0").mkdir()  # a training experiment, not a stack: never replaced
    assert stack.main(["--config", str(write_yaml(cfg, tmp_path / "ok.yaml"))]) == 2
    assert "is not a stack output" in caplog.text


def test_cli_writes_the_stack_and_report_scores_it(
    project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, df, members = project
    yaml = write_yaml(cfg, tmp_path / "stack.yaml")
    assert stack.main(["--config", str(yaml)]) == 0
    out = tmp_path / "output" / "stack"
    for name in (
        "oof.npz",
        "stack_report.csv",
        "stack_report.md",
        "stack.json",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    state = json.loads((out / "stack.json").read_text())
    assert state["members"] == ["a", "b"] and state["classes"] == CLASSES and state["kind"] == "xgboost"
    assert not (out / "stacker").exists()  # the stacker that ships is package.py's
    printed = capsys.readouterr().out
    single = f"single ({best_name(members, layout(4, per=25)[0], ['a', 'b'])})"
    assert "| xgboost **(chosen)** |" in printed and f"| {single} |" in printed
    assert "Both XGBoost forms ran: multi-class over all 4 classes, and the re-ranker" in printed
    assert "the truth among them for 100.00% of the images" in printed  # 4 classes: all are candidates

    csv = pd.read_csv(out / "stack_report.csv")
    assert csv["method"].tolist() == ["a", "b", single, "mean", "blend", "xgboost", "rerank"]
    assert csv["chosen"].tolist() == [False] * 5 + [True, False]
    # oof.npz holds the chosen stacker's nested OOF log-probabilities, aligned with folds.csv (float16).
    y, folds = layout(4, per=25)
    template = stacker.Stacker("xgboost", **cfg.stacker_options())
    nested = stacker.nested_fits(template, [float16(m) for m in members], y, folds)[0]
    saved, classes = aligned(out / "oof.npz", df)
    assert classes == CLASSES
    np.testing.assert_array_equal(saved, float16(stacker.log_probs(nested)))
    assert csv.loc[5, "accuracy"] == pytest.approx(float((nested.argmax(1) == y).mean()))

    # report.py scores the stack like any experiment (from the float16 file: ~1e-4 apart).
    assert report.main(["--config", str(yaml)]) == 0
    table = pd.read_csv(tmp_path / "output" / "report" / "report.csv")
    row = table[(table["exp"] == "stack") & (table["fold"] == "all")].iloc[0]
    assert row["accuracy"] == pytest.approx(csv.loc[5, "accuracy"])
    assert row["log_loss"] == pytest.approx(csv.loc[5, "log_loss"], rel=1e-3)

    # A re-run replaces the whole folder and leaves no staging folder.
    blend = write_yaml(make_cfg(tmp_path, stacker="blend"), tmp_path / "blend.yaml")
    assert stack.main(["--config", str(blend)]) == 0
    assert json.loads((out / "stack.json").read_text())["kind"] == "blend"
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == [
        "a",
        "b",
        "old_stack",
        "report",
        "stack",
    ]
    assert read_oof(out / "oof.npz")["logits"].dtype == np.float32


def test_many_classes_stack_top_k_members_with_the_re_ranker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """200 classes, members stored top-k (a small store_dense_max_cells): no multi-class XGBoost row and the
    markdown says why; the re-ranker reads the TopK members as stored, wins, and its nested OOF is written
    top-k, which report.py scores."""
    members, y, folds = complementary_members(n=600)
    present, y = np.unique(y, return_inverse=True)  # folds.csv knows the classes its labels name
    members = [m[:, present] for m in members]
    classes = [f"class {i:03d}" for i in present]
    cfg = make_cfg(tmp_path, store_dense_max_cells=1000, store_topk=20)
    df = write_folds(tmp_path, y, folds, classes)
    for name, logits in zip(["a", "b"], members, strict=True):
        write_member(cfg, name, df, logits, classes)
    got = stack.read_members(["a", "b"], output_dir=cfg.output_dir, folds=df, classes=classes)
    assert all(isinstance(m, TopK) and m.k == 20 for m in got)
    yaml = write_yaml(cfg, tmp_path / "stack.yaml")
    assert stack.main(["--config", str(yaml)]) == 0
    printed = capsys.readouterr().out
    assert f"No multi-class XGBoost row: {len(classes)} classes > stack_max_classes (50)" in printed
    assert "Ran instead: the re-ranker (rerank: XGBoost binary:logistic" in printed
    assert "| rerank **(chosen)** |" in printed and "Final re-ranker refitted on all OOF" in printed
    out = tmp_path / "output" / "stack"
    csv = pd.read_csv(out / "stack_report.csv")
    assert csv["method"].str.split(" ").str[0].tolist() == ["a", "b", "single", "mean", "blend", "rerank"]
    assert csv["chosen"].tolist() == [False] * 5 + [True]
    stored = read_oof(out / "oof.npz")
    assert stored["logits_index"].shape[1] == 40  # the whole candidate frame (two top-20s), not store_topk
    assert report.main(["--config", str(yaml)]) == 0
    table = pd.read_csv(tmp_path / "output" / "report" / "report.csv")
    row = table[(table["exp"] == "stack") & (table["fold"] == "all")].iloc[0]
    assert row["accuracy"] == pytest.approx(csv.loc[5, "accuracy"])
    assert row["log_loss"] == pytest.approx(csv.loc[5, "log_loss"], rel=1e-3)
