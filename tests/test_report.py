"""report.py on synthetic experiments (no training): the tables equal independently computed scores, OOF
files are matched to folds.csv by image name and refused when they differ, the figures are real PNGs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score
from tiny import CLASSES, base_cfg, write_yaml

import report
import score
from lib.oof import open_oof, write_oof

ELPV = ["defect_0", "defect_1", "defect_1of3", "defect_2of3"]
# Pipeline order by oof.npz age; names chosen so alphabetical order differs from it.
EXPERIMENTS = ["teacher", "student", "head_ft", "stack"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# train.py's LOG_COLUMNS, spelled out so these tests need not import torch (about 10 s here).
TRAIN_LOG_COLUMNS = [
    "epoch", "lr", "train_loss", "val_loss", "accuracy", "macro_f1",
    "ema_val_loss", "ema_accuracy", "ema_macro_f1", "images_per_s", "data_wait", "seconds",
]  # fmt: skip


def make_folds(root: Path, classes: list[str], per_class_fold: int = 3, n_folds: int = 3) -> pd.DataFrame:
    rows = [
        {"image": f"img {f}_{c}_{k}.png", "label": name, "group": len(classes) * f + c, "fold": f}
        for f in range(n_folds)
        for c, name in enumerate(classes)
        for k in range(per_class_fold)
    ]
    folds = pd.DataFrame(rows)
    folds.to_csv(root / "folds.csv", index=False)
    return folds


def one_hot(folds: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return (folds["label"].to_numpy()[:, None] == np.array(classes)[None, :]).astype(np.float64)


def write_exp(cfg, name: str, folds: pd.DataFrame, logits: np.ndarray, classes: list[str], age: int) -> Path:
    """OOF logits written in a shuffled row order (the report must match images by name), with a set mtime,
    in the format the config's store settings give."""
    path = Path(cfg.output_dir) / name / "oof.npz"
    order = np.random.default_rng(age).permutation(len(folds))
    write_oof(path, folds.iloc[order], logits[order], classes, **cfg.store_options())
    os.utime(path, (1_700_000_000 + age, 1_700_000_000 + age))
    return path


def write_train_log(exp_dir: Path, fold: int, epochs: int = 4) -> None:
    e = np.arange(1, epochs + 1)
    df = pd.DataFrame({c: np.linspace(0.1, 0.9, epochs) for c in TRAIN_LOG_COLUMNS})
    df["epoch"], df["lr"] = e, 1e-3 * 0.5 ** (e - 1) + 1e-6
    df["train_loss"], df["val_loss"] = 1.2 / e + 0.01 * fold, 1.0 / e + 0.2
    (exp_dir / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    df.to_csv(exp_dir / f"fold{fold}" / "log.csv", index=False)


def write_finetune_log(exp_dir: Path, fold: int) -> None:
    """finetune.py's layout: no ema or throughput columns, an epoch 0 row (before any step), a path column."""
    df = pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "lr": [np.nan, 1e-3, 0.0],
            "train_loss": [np.nan, 0.5, 0.4],
            "val_loss": [0.6, 0.45, 0.42],
            "accuracy": [0.7, 0.8, 0.85],
            "macro_f1": [0.6, 0.7, 0.75],
            "seconds": [1.0, 2.0, 2.0],
            "path": ["features", "features", "features"],
        }
    )
    (exp_dir / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    df.to_csv(exp_dir / f"fold{fold}" / "log.csv", index=False)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, dict]:
    """Four experiments over 27 images, 3 classes, 3 folds: noisy teacher, perfect student, fine-tune, stack."""
    cfg = base_cfg(tmp_path)
    folds = make_folds(tmp_path, CLASSES)
    rng = np.random.default_rng(0)
    y = one_hot(folds, CLASSES)
    logits = {
        "teacher": y + rng.normal(0, 0.8, y.shape),
        "student": 5 * y,
        "head_ft": 2 * y + rng.normal(0, 0.8, y.shape),
        "stack": np.log(np.where(y == 1, 0.8, 0.1)),  # softmax 0.8 on the truth: log-loss is -ln 0.8
    }
    for age, name in enumerate(EXPERIMENTS):
        write_exp(cfg, name, folds, logits[name], CLASSES, age)
    for fold in range(3):
        write_train_log(cfg.exp_dir.parent / "teacher", fold)
        write_train_log(cfg.exp_dir.parent / "student", fold)
        write_finetune_log(cfg.exp_dir.parent / "head_ft", fold)
    return write_yaml(cfg, tmp_path / "cfg.yaml"), {"cfg": cfg, "folds": folds, "logits": logits}


def read_report(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"exp": str, "fold": str})


def expected_scores(logits: np.ndarray, folds: pd.DataFrame) -> dict:
    """The scores computed without score.py: numpy argmax and log-softmax, sklearn's f1_score, on the logits
    as the OOF file holds them (rounded to float16, lib/oof.py)."""
    logits = logits.astype(np.float16).astype(np.float64)
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    truth = np.array([CLASSES.index(c) for c in folds["label"]])
    pred = logits.argmax(1)
    return {
        "accuracy": float(np.mean(pred == truth)),
        "macro_f1": f1_score(truth, pred, labels=[0, 1, 2], average="macro", zero_division=0),
        "log_loss": float(-log_p[np.arange(len(truth)), truth].mean()),
    }


def test_tables_and_figures(setup, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path, d = setup
    assert report.main(["--config", str(yaml_path)]) == 0
    out = Path(d["cfg"].output_dir) / "report"
    table = read_report(out / "report.csv")
    assert list(table.columns) == ["exp", "fold", "n", "accuracy", "macro_f1", "log_loss"]
    overall = table[table["fold"] == "all"].set_index("exp")
    assert list(overall.index) == EXPERIMENTS  # oof.npz age, not alphabetical
    assert (overall["n"] == 27).all()

    for name in ("teacher", "head_ft"):
        want = expected_scores(d["logits"][name], d["folds"])
        assert 0 < want["accuracy"] < 1  # the noisy experiments do make mistakes
        for key, value in want.items():
            assert overall.loc[name, key] == pytest.approx(value, rel=1e-5)
    assert overall.loc["student", ["accuracy", "macro_f1"]].tolist() == [1.0, 1.0]
    assert overall.loc["stack", "accuracy"] == 1.0
    assert overall.loc["stack", "log_loss"] == pytest.approx(-np.log(0.8), rel=1e-3)  # float16 log-probs

    per_fold = table[table["fold"] != "all"]
    assert len(per_fold) == 4 * 3 and (per_fold["n"] == 9).all()
    teacher_folds = per_fold[per_fold["exp"] == "teacher"].set_index("fold")
    for fold in range(3):
        want = expected_scores(
            d["logits"]["teacher"][d["folds"]["fold"] == fold], d["folds"][d["folds"]["fold"] == fold]
        )
        assert teacher_folds.loc[str(fold), "accuracy"] == pytest.approx(want["accuracy"])
        assert teacher_folds.loc[str(fold), "log_loss"] == pytest.approx(want["log_loss"], rel=1e-5)

    # Best by OOF accuracy: student and stack tie at 1.0 and on macro-F1; student has the lower log-loss.
    printed = capsys.readouterr().out
    assert printed == (out / "report.md").read_text()
    assert "| **student** (best) | 27 | 1.0000 | 1.0000 |" in printed
    assert "Best by OOF accuracy: **student**" in printed
    assert "| teacher | 0 | 9 |" in printed and "Held-out" not in printed
    assert "confusion.png (student)" in printed and "curves.png (teacher, student, head_ft)" in printed

    for png, min_width in (("confusion.png", 300), ("curves.png", 3 * 300)):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        with Image.open(out / png) as im:
            im.verify()
        with Image.open(out / png) as im:
            assert im.width > min_width and im.height > 300
    assert not list(out.glob(".*tmp*"))  # atomic writes left no temporary files


def test_named_experiments_in_given_order(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path, _ = setup
    out = tmp_path / "mine"
    assert report.main(["--config", str(yaml_path), "stack", "teacher", "--out", str(out)]) == 0
    table = read_report(out / "report.csv")
    assert table.loc[table["fold"] == "all", "exp"].tolist() == ["stack", "teacher"]
    assert "| **stack** (best) |" in capsys.readouterr().out
    assert "curves.png (teacher)" in (out / "report.md").read_text()


def test_the_full_fits_log_is_read_after_the_folds(tmp_path: Path) -> None:
    """full/log.csv (train.py --fold full) joins the curves, last; other folders are not folds."""
    exp_dir = tmp_path / "demo"
    for fold in (1, 0):
        write_train_log(exp_dir, fold)
    full = exp_dir / "full"
    full.mkdir()
    pd.DataFrame({"epoch": [1, 2], "lr": [1e-3, 1e-4], "train_loss": [0.9, 0.5], "val_loss": [np.nan, np.nan]}).to_csv(
        full / "log.csv", index=False
    )
    (exp_dir / "report").mkdir()
    pd.DataFrame({"epoch": [1], "lr": [1e-3]}).to_csv(exp_dir / "report" / "log.csv", index=False)
    logs = report.read_logs(exp_dir)
    assert [fold for fold, _ in logs] == [0, 1, "full"]
    assert logs[2][1]["train_loss"].tolist() == [0.9, 0.5]
    report.plot_curves({"demo": logs}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_image_is_refused_with_the_file_named(setup, caplog: pytest.LogCaptureFixture) -> None:
    yaml_path, d = setup
    folds, cfg = d["folds"], d["cfg"]
    path = write_exp(cfg, "student", folds.iloc[1:], d["logits"]["student"][1:], CLASSES, 1)
    assert report.main(["--config", str(yaml_path)]) == 2
    assert str(path) in caplog.text and "1 missing" in caplog.text and "re-run" in caplog.text
    assert not (Path(cfg.output_dir) / "report" / "report.csv").exists()


def test_other_fold_ids_are_refused(setup, caplog: pytest.LogCaptureFixture) -> None:
    yaml_path, d = setup
    folds, cfg = d["folds"], d["cfg"]
    moved = folds.assign(fold=(folds["fold"] + 1) % 3)
    path = write_exp(cfg, "teacher", moved, d["logits"]["teacher"], CLASSES, 0)
    assert report.main(["--config", str(yaml_path)]) == 2
    assert str(path) in caplog.text and "another fold id" in caplog.text


def test_other_classes_are_refused(setup, caplog: pytest.LogCaptureFixture) -> None:
    yaml_path, d = setup
    path = write_exp(d["cfg"], "stack", d["folds"], d["logits"]["stack"], ["a", "b", "c"], 3)
    assert report.main(["--config", str(yaml_path)]) == 2
    assert str(path) in caplog.text and "other classes" in caplog.text


def test_nothing_to_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = base_cfg(tmp_path)
    make_folds(tmp_path, CLASSES)
    yaml_path = write_yaml(cfg, tmp_path / "cfg.yaml")
    assert report.main(["--config", str(yaml_path)]) == 2
    assert "no experiment with an oof.npz" in caplog.text and "src/train.py" in caplog.text
    caplog.clear()
    assert report.main(["--config", str(yaml_path), "nope"]) == 2
    assert str(Path(cfg.output_dir) / "nope" / "oof.npz") in caplog.text


def test_missing_folds_csv(setup, caplog: pytest.LogCaptureFixture) -> None:
    yaml_path, d = setup
    Path(d["cfg"].folds_csv).unlink()
    assert report.main(["--config", str(yaml_path)]) == 2
    assert "src/folds.py" in caplog.text


def score_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], classes: list[str]) -> Path:
    """The JSON score.py --json prints for a 4-image test set with one error."""
    truth = pd.DataFrame({"image": list("abcd"), "label": [classes[0], classes[0], classes[1], classes[2]]})
    sub = truth.assign(label=[classes[0], classes[0], classes[1], classes[1]])
    truth.to_csv(tmp_path / "labels.csv", index=False)
    sub.to_csv(tmp_path / "sub.csv", index=False)
    capsys.readouterr()
    assert score.main([str(tmp_path / "sub.csv"), str(tmp_path / "labels.csv"), "--json"]) == 0
    path = tmp_path / "test_scores.json"
    path.write_text(capsys.readouterr().out)
    return path


def test_held_out_line_without_anchor(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path, _ = setup
    scores = score_json(tmp_path, capsys, CLASSES)
    assert report.main(["--config", str(yaml_path), "--test-scores", str(scores)]) == 0
    printed = capsys.readouterr().out
    assert "Held-out test (4 images): accuracy **75.00%**, macro-F1 0.5556" in printed
    assert "published anchor" not in printed


def test_held_out_line_with_the_configured_anchor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = base_cfg(tmp_path, anchor_name="Deitsch et al. 2019", anchor_accuracy=0.8842)
    folds = make_folds(tmp_path, ELPV, per_class_fold=2, n_folds=2)
    write_exp(cfg, "demo", folds, 3 * one_hot(folds, ELPV), ELPV, 0)
    yaml_path = write_yaml(cfg, tmp_path / "cfg.yaml")
    scores = score_json(tmp_path, capsys, ELPV)
    assert report.main(["--config", str(yaml_path), "--test-scores", str(scores)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy **75.00%**" in printed and "published anchor, Deitsch et al. 2019: 88.42%" in printed
    assert not (Path(cfg.output_dir) / "report" / "curves.png").exists()  # no logs, no curves


@pytest.mark.parametrize("content", ["{not json", json.dumps({"accuracy": 0.9}), json.dumps([1, 2])])
def test_wrong_test_scores_file(
    setup, tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    yaml_path, _ = setup
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert report.main(["--config", str(yaml_path), "--test-scores", str(bad)]) == 2
    assert str(bad) in caplog.text and "score.py" in caplog.text


def many_class_experiment(tmp_path: Path, **store) -> tuple[Path, pd.DataFrame, np.ndarray]:
    """120 classes x 3 folds x 1 image; class 2k+1 (k < 10) is predicted as 2k+2 in fold 0, and class 7 as
    class 8 everywhere (the most confused pair); written with the ``store`` settings (e.g. top-k)."""
    classes = [f"species {c:03d}" for c in range(120)]
    cfg = base_cfg(tmp_path, **store)
    folds = make_folds(tmp_path, classes, per_class_fold=1, n_folds=3)
    y = one_hot(folds, classes).argmax(1)
    pred = y.copy()
    pred[(folds["fold"] == 0).to_numpy() & (y % 2 == 1) & (y < 20)] += 1
    pred[y == 7] = 8
    logits = np.random.default_rng(0).normal(0, 1, (len(folds), len(classes)))
    logits[np.arange(len(folds)), pred] += 8
    write_exp(cfg, "big", folds, logits, classes, 0)
    return write_yaml(cfg, tmp_path / "cfg.yaml"), folds, pred


def test_many_classes_report_recall_quantiles_and_tables_not_a_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    yaml_path, folds, pred = many_class_experiment(tmp_path, store_dense_max_cells=0, store_topk=5)
    assert open_oof(Path(base_cfg(tmp_path).output_dir) / "big" / "oof.npz").topk is not None  # read top-k
    matrices = []
    monkeypatch.setattr(report, "confusion_counts", lambda *a: matrices.append(a) or np.zeros((2, 2)))
    out = tmp_path / "output" / "report"
    out.mkdir(parents=True)
    (out / "confusion.png").write_bytes(b"stale")
    assert report.main(["--config", str(yaml_path)]) == 0
    assert not matrices and not (out / "confusion.png").exists()  # no C x C matrix above the limit
    data = (out / "recall.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    text = (out / "report.md").read_text()
    assert "Figures: recall.png (big)" in text
    # Recall per class: 1 of 3 images wrong for the 10 odd classes below 20, all 3 for class 7.
    y = one_hot(folds, [f"species {c:03d}" for c in range(120)]).argmax(1)
    recall = np.array([np.mean(pred[y == c] == c) for c in range(120)])
    quantiles = [np.quantile(recall, q) for q in report.QUANTILES.values()]
    assert "| classes | " + " | ".join(f"{q:.4f}" for q in [*quantiles, recall.mean()]) + " |" in text
    assert "| species 007 | 3 | 0.0000 | species 008 (3) |" in text  # the worst class first
    assert "| species 001 | 3 | 0.6667 | species 002 (1) |" in text
    assert "| species 007 | species 008 | 3 | 1.0000 |" in text  # the most confused pair first
    table = read_report(out / "report.csv")
    assert table.loc[table["fold"] == "all", "accuracy"].item() == pytest.approx(np.mean(pred == y))


def test_up_to_50_classes_draw_the_full_confusion_matrix(tmp_path: Path) -> None:
    truth = np.repeat(np.arange(50), 3)
    pred = truth.copy()
    pred[7 * 3 : 7 * 3 + 2] = 8
    counts = report.confusion_counts(truth, pred, 50)
    assert counts.shape == (50, 50) and counts[7, 8] == 2 and counts[7, 7] == 1 and counts.sum() == 150
    with pytest.raises(ValueError, match="no confusion matrix above 50"):
        report.confusion_counts(np.arange(51), np.arange(51), 51)
    path = tmp_path / "confusion.png"
    report.plot_confusion(
        report.Scored("fifty", tmp_path, [f"class {k}" for k in range(50)], truth, pred), path
    )
    assert path.read_bytes().startswith(PNG_MAGIC)


def write_round(out: Path, student: str, verdict: dict | None, settings: dict | None = None) -> None:
    """A distillation round as train.py and distill.py leave it: the student's config.yaml naming the
    teacher's soft labels, their JSON (``settings``), and the pilot's verdict where there was one."""
    soft = out / "teacher" / "soft_labels.npz"
    (out / student).mkdir(parents=True, exist_ok=True)
    (out / student / "config.yaml").write_text(f"exp: {student}\nsoft_labels: {soft}\n")
    if settings is not None:
        soft.with_suffix(".json").write_text(json.dumps(settings))
    if verdict is not None:
        (out / student / "distill_verdict.json").write_text(json.dumps(verdict))


PILOT = {
    "fold": 0, "rows": 9, "student": {"exp": "x", "log_loss": 0.9, "accuracy": 0.6},
    "teacher": {"exp": "teacher", "log_loss": 0.8, "accuracy": 0.7}, "alpha": 0.8, "temperature": 1.25,
    "alpha_from": "auto", "temperature_from": "auto",
}  # fmt: skip
SCORES = "student nested log-loss 0.9000, accuracy 0.6000 vs teacher 0.8000, 0.7000 on fold 0's 9 images"


@pytest.mark.parametrize(
    ("student", "verdict", "line"),
    [
        (None, None, "- Distillation: not configured (no experiment here was trained on soft labels)."),
        (
            "pupil", {**PILOT, "pays": False},
            "- Distillation `pupil` (soft labels of `teacher`, alpha 0.8 (auto), T 1.25 (auto)): **skipped** after "
            f"the fold-0 pilot: {SCORES}; later stages build on the teacher.",
        ),
        (
            "student", {**PILOT, "pays": True},
            "- Distillation `student` (soft labels of `teacher`, alpha 0.8 (auto), T 1.25 (auto)): **ran**: the "
            f"fold-0 pilot paid ({SCORES}), then every fold.",
        ),
        (
            "student", None,
            "- Distillation `student` (soft labels of `teacher`, alpha 0.65 (config), T 1 (config)): ran on every "
            "fold (no pilot).",
        ),
    ],
)  # fmt: skip
def test_the_report_says_which_rounds_ran(
    setup, student: str | None, verdict: dict | None, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    yaml_path, d = setup
    out = Path(d["cfg"].output_dir)
    if student:
        write_round(
            out,
            student,
            verdict,
            {"alpha": 0.65, "temperature": 1.0, "alpha_from": "config", "temperature_from": "config"},
        )
    assert report.main(["--config", str(yaml_path), "--exp", "teacher"]) == 0
    printed = capsys.readouterr().out
    assert "## Rounds\n\n- Teacher `teacher`: every fold (OOF).\n" in printed
    assert line in printed.splitlines()
    if student == "pupil":  # a student with one fold is never reported as an experiment
        assert "| pupil |" not in printed
