"""distill.py + train.py --soft-labels: soft labels aligned with folds.csv, leaked teachers refused,
students trained on the soft targets (with and without MixUp) and validated on the hard labels; auto alpha
and temperature from the teacher's nested OOF, and the pilot fold's verdict."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from timm.data import Mixup
from tiny import base_cfg, fold_data, make_data, write_yaml

import distill
import train
from lib.config import Config, ConfigError, load_config, parse_config, save_config
from lib.data import ImageDataset
from lib.layout import read_folds
from lib.metrics import fit_temperature, log_softmax, softmax
from lib.models import load_checkpoint
from lib.oof import SOFT_KEY, OOFError, TopK, load_soft_labels, open_oof, read_oof, write_oof


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    make_data(root, per_class=8)
    return root


def teacher_oof(cfg, order: np.ndarray | None = None, folds: pd.DataFrame | None = None) -> np.ndarray:
    """A fake teacher: logits that encode each image's row number, written in a shuffled row order."""
    folds = read_folds(Path(cfg.folds_csv)) if folds is None else folds
    n = len(folds)
    logits = np.zeros((n, 3), np.float32)
    logits[:, 0] = np.arange(n) / n  # row i's first logit identifies it
    order = np.random.default_rng(1).permutation(n) if order is None else order
    cfg.exp_dir.mkdir(parents=True, exist_ok=True)
    classes = sorted(folds["label"].unique())
    write_oof(cfg.exp_dir / "oof.npz", folds.iloc[order], logits[order], classes)
    return logits


def test_soft_targets_formula() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = np.array([1, 2])
    soft = distill.soft_targets(logits, labels, alpha=0.7, temperature=2.0)
    p = np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)
    expected = 0.7 * np.eye(3)[labels] + 0.3 * p
    np.testing.assert_allclose(soft, expected, rtol=1e-6)
    np.testing.assert_allclose(soft.sum(1), 1, rtol=1e-6)
    np.testing.assert_array_equal(distill.soft_targets(logits, labels, 1.0, 1.0), np.eye(3)[labels])


def test_soft_labels_follow_folds_csv_order(data_root: Path, tmp_path: Path) -> None:
    cfg = base_cfg(data_root, output_dir=str(tmp_path / "out"), distill_alpha=0.6, distill_temperature=1.0)
    logits = teacher_oof(cfg)
    out = distill.make_soft_labels(cfg)
    assert out == cfg.exp_dir / "soft_labels.npz"
    folds = read_folds(Path(cfg.folds_csv))
    saved = read_oof(out)
    np.testing.assert_array_equal(saved["image"], folds["image"].to_numpy(dtype=str))
    np.testing.assert_array_equal(saved["fold"], folds["fold"].to_numpy())
    labels = folds["label"].map({c: i for i, c in enumerate(sorted(folds["label"].unique()))}).to_numpy()
    # Stored: the soft labels' logarithms, rounded to float16 (the store's precision).
    log_soft = distill.log_soft_targets(logits, labels, 0.6, 1.0)
    np.testing.assert_array_equal(saved[SOFT_KEY], log_soft.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(np.exp(log_soft), distill.soft_targets(logits, labels, 0.6, 1.0), rtol=1e-6)
    # The loader's view: every training image of fold 1 gets its own row, a distribution within float16's
    # rounding of the soft label.
    data = fold_data(dataclasses.replace(cfg, soft_labels=str(out)), 1)
    rows = folds.reset_index(drop=True)
    expected = distill.soft_targets(logits, labels, 0.6, 1.0)[rows.index[rows["fold"] != 1]]
    np.testing.assert_allclose(data.train_targets, expected, rtol=2e-3)
    np.testing.assert_allclose(data.train_targets.sum(1), 1, rtol=1e-6)
    assert data.train_targets.shape == (len(data.train), 3)


def test_teacher_with_other_fold_ids_is_refused(data_root: Path, tmp_path: Path, caplog) -> None:
    cfg = base_cfg(data_root, output_dir=str(tmp_path / "out"))
    folds = read_folds(Path(cfg.folds_csv))
    a, b = folds.index[folds["fold"] == 0][0], folds.index[folds["fold"] == 1][0]
    leaked = folds.copy()
    leaked.loc[[a, b], "fold"] = leaked.loc[[b, a], "fold"].to_numpy()
    teacher_oof(cfg, folds=leaked)
    with pytest.raises(OOFError, match=r"2 image\(s\) carry another fold id.*" + folds.loc[a, "image"]):
        distill.make_soft_labels(cfg)
    assert distill.main(["--config", str(write_yaml(cfg, tmp_path / "t.yaml"))]) == 2
    assert "another fold id" in caplog.text


def test_teacher_missing_images_or_classes_is_refused(data_root: Path, tmp_path: Path) -> None:
    cfg = base_cfg(data_root, output_dir=str(tmp_path / "out"))
    folds = read_folds(Path(cfg.folds_csv))
    teacher_oof(cfg, order=np.arange(len(folds) - 1))
    with pytest.raises(OOFError, match=r"1 missing \('" + folds["image"].iloc[-1]):
        distill.make_soft_labels(cfg)
    (cfg.exp_dir / "oof.npz").unlink()
    with pytest.raises(OOFError, match="not found: train every fold"):
        distill.make_soft_labels(cfg)
    write_oof(cfg.exp_dir / "oof.npz", folds, np.zeros((len(folds), 3)), ["a", "b", "c"])
    with pytest.raises(OOFError, match="retrain the teacher"):
        distill.make_soft_labels(cfg)


def test_student_refuses_soft_labels_from_other_folds(data_root: Path, tmp_path: Path, caplog) -> None:
    cfg = base_cfg(data_root, output_dir=str(tmp_path / "out"))
    folds = read_folds(Path(cfg.folds_csv))
    reseeded = folds.assign(fold=(folds["fold"] + 1) % folds["fold"].nunique())
    path = tmp_path / "soft.npz"
    uniform = np.full((len(folds), 3), np.log(1 / 3))
    write_oof(path, reseeded, uniform, sorted(folds["label"].unique()), key=SOFT_KEY)
    student = dataclasses.replace(cfg, exp="student", soft_labels=str(path))
    assert train.main(["--config", str(write_yaml(student, tmp_path / "s.yaml")), "--fold", "0"]) == 2
    assert "carry another fold id" in caplog.text and str(path) in caplog.text


def test_student_trains_on_soft_targets_and_validates_on_hard_labels(data_root: Path, tmp_path: Path) -> None:
    cfg = base_cfg(data_root, output_dir=str(tmp_path / "out"), epochs=1)
    teacher_oof(cfg)
    soft = distill.make_soft_labels(cfg)
    results = {}
    for name, extra in (("hard", {}), ("soft", {"soft_labels": str(soft)})):
        student = dataclasses.replace(cfg, exp=name, **extra)
        train.train_fold(student, 0)
        results[name] = load_checkpoint(student.exp_dir / "fold0" / "best.pt")
        log = pd.read_csv(student.exp_dir / "fold0" / "log.csv")
        assert 0 <= log["accuracy"].iloc[0] <= 1  # scored against the hard labels of the validation images
    changed = [
        k for k, v in results["soft"]["model"].items()
        if v.is_floating_point() and not torch.equal(v, results["hard"]["model"][k])
    ]  # fmt: skip
    assert changed, "the soft targets changed nothing: the student ignored them"
    assert results["soft"]["config"]["soft_labels"] == str(soft)


def student_trainer(cfg: Config, exp: str, out: Path) -> train.Trainer:
    """A teacher's OOF, its soft labels, and the Trainer of student ``exp``'s fold 0 on them (nothing trained)."""
    teacher_oof(cfg)
    soft = distill.make_soft_labels(cfg)
    student = dataclasses.replace(cfg, exp=exp, soft_labels=str(soft))
    return train.Trainer(student, 0, fold_data(student, 0), out, 0, 1, torch.device("cpu"))


def test_mixup_mixes_soft_targets_as_rows(data_root: Path, tmp_path: Path) -> None:
    cfg = base_cfg(data_root, output_dir=str(tmp_path / "out"), epochs=1, mixup_alpha=0.4, mix_prob=1.0)
    trainer = student_trainer(cfg, "mix", tmp_path)
    assert isinstance(trainer.mixup, Mixup)
    y = torch.from_numpy(trainer.data.train_targets[:4].copy())
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()  # image i is the constant i
    mixed_x, mixed = trainer.mixup(x, y)
    lam = 1 - float(mixed_x[0, 0, 0, 0]) / 3  # image 0 became lam * 0 + (1 - lam) * 3
    torch.testing.assert_close(mixed, lam * y + (1 - lam) * y.flip(0))
    torch.testing.assert_close(mixed.sum(1), torch.ones(4))
    trainer.fit()
    assert (tmp_path / "best.pt").is_file()


def many_class_teacher(root: Path, **overrides) -> tuple:
    """A folds.csv of 30 classes x 6 images over 3 folds (no images: distill reads none) and a teacher's
    OOF logits, the true class's logit -10 in the first 12 rows (so it is far outside their top k)."""
    classes = [f"c{j:02d}" for j in range(30)]
    folds = pd.DataFrame([
        {"image": f"{j}_{i}.png", "label": classes[j], "group": 6 * j + i, "fold": i % 3}
        for j in range(30) for i in range(6)
    ])  # fmt: skip
    folds.to_csv(root / "folds.csv", index=False)
    cfg = base_cfg(root, output_dir=str(root / "out"), **overrides)
    y = np.repeat(np.arange(30), 6)
    logits = np.random.default_rng(0).normal(0, 3, (len(folds), 30))
    logits[np.arange(12), y[:12]] = -10
    cfg.exp_dir.mkdir(parents=True)
    write_oof(cfg.exp_dir / "oof.npz", folds, logits, classes)
    return cfg, folds, classes, y, read_oof(cfg.exp_dir / "oof.npz")["logits"]


@pytest.mark.parametrize(("alpha", "temperature"), [(0.3, 2.0), (0.0, 1.0)])
def test_top_k_soft_labels_give_the_dense_targets_of_their_classes(
    tmp_path: Path, alpha: float, temperature: float
) -> None:
    store = {"distill_alpha": alpha, "distill_temperature": temperature}
    cfg, folds, classes, y, logits = many_class_teacher(tmp_path, **store)
    dense_file = distill.make_soft_labels(cfg, tmp_path / "dense.npz")
    top_file = distill.make_soft_labels(
        dataclasses.replace(cfg, store_dense_max_cells=0, store_topk=5), tmp_path / "top.npz"
    )
    assert open_oof(dense_file, SOFT_KEY).dense is not None and open_oof(top_file, SOFT_KEY).topk is not None
    dense = load_soft_labels(dense_file, folds, classes)
    top = load_soft_labels(top_file, folds, classes)
    assert isinstance(top, TopK) and top.k == 5
    assert (
        (top.index == y[:, None]).any(1).all()
    )  # the true class is kept, even when the teacher ranks it low
    exact = distill.soft_targets(logits, y, alpha, temperature)
    rows = np.arange(len(y))[:, None]
    probs = top.probs()
    # The kept classes get the dense soft label's probabilities (within float16 log-probabilities' rounding),
    # the other 25 share the rest evenly, and every row is a distribution.
    np.testing.assert_allclose(probs[rows, top.index], exact[rows, top.index], rtol=5e-3, atol=1e-6)
    np.testing.assert_allclose(probs[rows, top.index], dense[rows, top.index], rtol=5e-3, atol=1e-6)
    outside = np.ones_like(probs, bool)
    outside[rows, top.index] = False
    residual = 1 - exact[rows, top.index].sum(1)
    np.testing.assert_allclose(
        probs[outside].reshape(-1, 25), np.repeat(residual[:, None] / 25, 25, 1), atol=1e-5
    )
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-6)
    # What training sees: the dataset makes one image's row dense at a time.
    dataset = ImageDataset(["unused.png"] * len(y), top, transform=lambda image: {"image": image})
    dataset.decode = lambda path: np.zeros((4, 4, 3), np.uint8)
    for i in (0, 7, len(y) - 1):
        torch.testing.assert_close(dataset[i][1], torch.from_numpy(probs[i]))
        assert dataset[i][1].shape == (30,)


def test_student_trains_on_top_k_soft_labels(data_root: Path, tmp_path: Path) -> None:
    cfg = base_cfg(
        data_root, output_dir=str(tmp_path / "out"), epochs=1, store_dense_max_cells=0, store_topk=2
    )
    trainer = student_trainer(cfg, "topk", tmp_path)
    assert isinstance(trainer.data.soft, TopK) and trainer.data.soft.k == 2
    _, targets = next(iter(trainer.train_loader))
    assert targets.shape == (cfg.batch_size, 3) and targets.dtype == torch.float32  # dense per batch
    torch.testing.assert_close(targets.sum(1), torch.ones(cfg.batch_size))
    trainer.fit()
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "oof.npz").is_file()


# ---------------------------------------------------------------------------------------------------------
# distill_alpha / distill_temperature: auto, and the pilot's verdict (synthetic OOF files, no training).


def synthetic_teacher(root: Path, logits: np.ndarray, y: np.ndarray, n_folds: int = 4, **overrides) -> tuple:
    """A folds.csv of len(y) images (no files: distill reads none; each its own group, folds dealt in turn),
    the teacher's OOF ``logits`` written beside it, and its config."""
    classes = [f"k{j}" for j in range(logits.shape[1])]
    folds = pd.DataFrame({
        "image": [f"{i}.png" for i in range(len(y))], "label": [classes[c] for c in y],
        "group": np.arange(len(y)), "fold": np.arange(len(y)) % n_folds,
    })  # fmt: skip
    folds.to_csv(root / "folds.csv", index=False)
    cfg = base_cfg(root, output_dir=str(root / "out"), **overrides)
    cfg.exp_dir.mkdir(parents=True, exist_ok=True)
    write_oof(cfg.exp_dir / "oof.npz", folds, logits, classes)
    return cfg, folds, classes


def drawn(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logits [n, c] and labels drawn from their softmax: a perfectly calibrated model's view."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0, 2, (n, c))
    y = (softmax(true).cumsum(1) > rng.random((n, 1))).argmax(1)
    return true, y


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("distill_alpha: 1.5\n", "distill_alpha must be a number in 0..1, 'auto' or 'none', got 1.5"),
        ("distill_alpha: sometimes\n", "key 'distill_alpha' must be float or 'auto' or 'none', got 'sometimes'"),
        ("distill_temperature: 0\n", "distill_temperature must be a number > 0 or 'auto', got 0.0"),
        ("distill_temperature: Auto\n", "key 'distill_temperature' must be float or 'auto'"),
    ],
)
def test_distill_keys_take_a_number_or_auto_and_alpha_none(tmp_path: Path, text: str, match: str) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(yml)
    yml.write_text("distill_alpha: auto\ndistill_temperature: 2\n")
    cfg = load_config(yml)
    assert (cfg.distill_alpha, cfg.distill_temperature) == ("auto", 2.0)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    flags, _ = parse_config(["--distill-alpha", "0.4", "--distill-temperature", "auto"], stage="distill")
    assert (flags.distill_alpha, flags.distill_temperature) == (0.4, "auto")
    with pytest.raises(SystemExit):
        parse_config(["--distill-alpha", "most"], stage="distill")
    yml.write_text("distill_alpha: none\n")  # a plain YAML word (off would read as false)
    assert load_config(yml).distill_alpha == "none"
    off, _ = parse_config(["--distill-alpha", "none"], stage="distill")
    assert off.distill_alpha == "none"
    with pytest.raises(distill.DistillError, match="distill_alpha is none"):
        distill.make_soft_labels(off)


@pytest.mark.parametrize("k", [0.4, 2.5])
def test_nested_temperature_scaling_recovers_a_planted_temperature(tmp_path: Path, k: float) -> None:
    true, y = drawn(8000, 5)
    folds = np.arange(len(y)) % 4
    assert fit_temperature(true * k, y) == pytest.approx(k, rel=0.05)
    temperatures, log_p = distill.nested_temperatures(true * k, y, folds)
    assert sorted(temperatures) == [0, 1, 2, 3]
    assert all(t == pytest.approx(k, rel=0.08) for t in temperatures.values())
    # Fold 0's T is fitted on the other folds' rows only, and scores fold 0's rows.
    assert temperatures[0] == pytest.approx(fit_temperature((true * k)[folds != 0], y[folds != 0]))
    rows = np.flatnonzero(folds == 0)
    np.testing.assert_allclose(
        log_p[rows], log_softmax(true[rows] * k / temperatures[0])[np.arange(len(rows)), y[rows]]
    )
    # Calibrated, the over- or under-confident logits score about as well as the true ones.
    true_loss = -log_softmax(true)[np.arange(len(y)), y].mean()
    raw_loss = -log_softmax(true * k)[np.arange(len(y)), y].mean()
    assert -log_p.mean() == pytest.approx(true_loss, rel=0.01) and raw_loss > 1.05 * true_loss

    # distill_temperature: auto makes the soft labels at the T fitted on every row, and says so beside them.
    cfg, table, classes = synthetic_teacher(
        tmp_path, true * k, y, distill_alpha=0.5, distill_temperature="auto"
    )
    out = distill.make_soft_labels(cfg)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["alpha"], meta["alpha_from"], meta["temperature_from"]) == (0.5, "config", "auto")
    assert meta["temperature"] == pytest.approx(k, rel=0.05)
    assert sorted(meta["nested"]["group_temperatures"]) == ["0", "1", "2", "3"]
    stored = read_oof(cfg.exp_dir / "oof.npz")["logits"]
    expected = distill.soft_targets(stored, y, 0.5, meta["temperature"])
    np.testing.assert_allclose(
        load_soft_labels(out, table, classes), expected, rtol=5e-3, atol=1e-6
    )  # float16 log-probabilities


def nested_ratio(logits: np.ndarray, y: np.ndarray, folds: np.ndarray, temperatures: dict) -> float:
    """The auto alpha's rule recomputed here: the teacher's log-loss with each fold at its own T over the
    log-loss of the add-one class frequencies of the other folds."""
    c = logits.shape[1]
    teacher, prior = np.zeros(len(y)), np.zeros(len(y))
    for f in np.unique(folds):
        rows = folds == f
        teacher[rows] = -log_softmax(logits[rows] / temperatures[str(f)])[np.arange(rows.sum()), y[rows]]
        counts = np.bincount(y[~rows], minlength=c) + 1
        prior[rows] = -np.log(counts[y[rows]] / counts.sum())
    return teacher.mean() / prior.mean()


def test_auto_alpha_is_the_nested_log_loss_ratio_and_follows_the_teachers_quality(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 2000)
    signal = {"near-perfect": 6.0, "middling": 1.5, "noisy": 0.2}
    alphas = {}
    for name, strength in signal.items():
        root = tmp_path / name
        root.mkdir()
        logits = strength * np.eye(4)[y] + rng.normal(0, 1, (len(y), 4))
        cfg, table, classes = synthetic_teacher(root, logits, y, distill_alpha="auto")
        out = distill.make_soft_labels(cfg)
        meta = json.loads(out.with_suffix(".json").read_text())
        assert (meta["alpha_from"], meta["temperature"], meta["temperature_from"]) == ("auto", 1.0, "config")
        stored = read_oof(cfg.exp_dir / "oof.npz")["logits"]
        ratio = nested_ratio(stored, y, table["fold"].to_numpy(), meta["nested"]["group_temperatures"])
        assert meta["nested"]["log_loss"] / meta["nested"]["prior_log_loss"] == pytest.approx(ratio, rel=1e-9)
        assert meta["alpha"] == min(distill.ALPHA_GRID, key=lambda a: abs(a - ratio))
        alphas[name] = meta["alpha"]
        # The soft labels are made with it.
        soft = load_soft_labels(out, table, classes)
        np.testing.assert_allclose(
            soft, distill.soft_targets(stored, y, meta["alpha"], 1.0), rtol=5e-3, atol=1e-6
        )
    assert alphas["near-perfect"] == 0.3 and alphas["noisy"] == 0.9
    assert 0.3 < alphas["middling"] < 0.9


def pilot(root: Path, teacher: np.ndarray, student: np.ndarray, y: np.ndarray) -> Config:
    """A teacher's OOF and soft labels (auto) and a student trained on them whose fold 0 alone has an OOF
    file (``student``'s fold-0 rows, written shuffled), as run_all.sh's pilot leaves them."""
    cfg, table, classes = synthetic_teacher(
        root, teacher, y, distill_alpha="auto", distill_temperature="auto"
    )
    soft = distill.make_soft_labels(cfg)
    pupil = dataclasses.replace(cfg, exp="student", soft_labels=str(soft))
    (pupil.exp_dir / "fold0").mkdir(parents=True)
    save_config(pupil, pupil.exp_dir / "config.yaml")
    rows = np.flatnonzero(table["fold"].to_numpy() == 0)[::-1]
    write_oof(pupil.exp_dir / "fold0" / "oof.npz", table.iloc[rows], student[rows], classes)
    return cfg


@pytest.mark.parametrize(("student_signal", "pays"), [(3.0, True), (None, False), (0.3, False)])
def test_the_verdict_says_whether_the_pilot_fold_pays(tmp_path: Path, student_signal, pays: bool) -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 1200)
    teacher = 1.0 * np.eye(3)[y] + rng.normal(0, 1, (len(y), 3))
    # None: the student is the teacher again, which does not pay (the log-loss must be strictly lower).
    student = (
        teacher.copy()
        if student_signal is None
        else student_signal * np.eye(3)[y] + rng.normal(0, 1, (len(y), 3))
    )
    cfg = pilot(tmp_path, teacher, student, y)
    assert (
        distill.main(
            ["--config", str(write_yaml(cfg, tmp_path / "t.yaml")), "--verdict", "--student", "student"]
        )
        == 0
    )
    verdict = json.loads((tmp_path / "out" / "student" / "distill_verdict.json").read_text())
    assert verdict["pays"] is pays and verdict["fold"] == 0
    rows = np.arange(len(y)) % 4 == 0
    assert verdict["rows"] == rows.sum()
    soft_meta = json.loads((cfg.exp_dir / "soft_labels.json").read_text())
    assert verdict["alpha"] == soft_meta["alpha"] and verdict["temperature"] == soft_meta["temperature"]
    halves = distill.half_split(np.flatnonzero(rows), cfg.seed)  # groups are the row numbers here
    for name, logits in (("student", student), ("teacher", teacher)):
        s = verdict[name]
        z = logits[rows].astype(np.float16).astype(np.float64)  # as stored
        assert s["accuracy"] == pytest.approx(np.mean(z.argmax(1) == y[rows]))
        loss = []
        for h in (0, 1):
            part = halves == h
            log_p = log_softmax(z[part] / s["half_temperatures"][str(h)])
            loss.append(-log_p[np.arange(part.sum()), y[rows][part]])
        assert s["log_loss"] == pytest.approx(np.concatenate(loss).mean(), rel=1e-9)
        # Each half's T is fitted on the other half.
        other = halves == 1
        assert s["half_temperatures"]["0"] == pytest.approx(fit_temperature(z[other], y[rows][other]))
    assert (verdict["student"]["log_loss"] < verdict["teacher"]["log_loss"]) == (student_signal == 3.0)


def test_a_better_log_loss_with_fewer_rows_right_does_not_pay() -> None:
    # Two classes. Teacher: right by a margin of 1 on 90% of rows, wrong by 1 on the rest (calibrated
    # log-loss ~0.33). Student: right by 8 on 85%, wrong by a hair on 15%: a lower log-loss, fewer right.
    n = 400
    y = np.zeros(n, int)
    teacher = np.zeros((n, 2))
    teacher[:, 0] = np.where(np.arange(n) % 10 < 9, 1.0, -1.0)
    student = np.zeros((n, 2))
    student[:, 0] = np.where(np.arange(n) % 20 < 17, 8.0, -0.01)
    halves = np.arange(n) % 2
    found = distill.judge(student, teacher, y, halves)
    assert found["student"]["log_loss"] < found["teacher"]["log_loss"]
    assert found["student"]["accuracy"] == 0.85 and found["teacher"]["accuracy"] == 0.9
    assert found["pays"] is False
    assert distill.judge(student, student, y, halves)["pays"] is False  # equal is not better
    sharper = student.copy()
    sharper[np.arange(n) % 20 >= 17, 0] = 0.01  # the same margins, now right by a hair: pays
    assert distill.judge(sharper, student, y, halves)["pays"] is True


def test_the_verdict_names_what_is_missing(tmp_path: Path, caplog) -> None:
    true, y = drawn(200, 3)
    cfg = pilot(tmp_path, true, true, y)
    yaml_path = str(write_yaml(cfg, tmp_path / "t.yaml"))
    assert distill.main(["--config", yaml_path, "--verdict", "--student", "nobody"]) == 2
    assert "student 'nobody', fold 0" in caplog.text and "not found" in caplog.text
    assert distill.main(["--config", yaml_path, "--verdict", "--student", "student", "--fold", "1"]) == 2
    assert "student 'student', fold 1" in caplog.text
    assert distill.main(["--config", yaml_path, "--verdict", "--student", "student", "--fold", "7"]) == 2
    assert "fold 7 is not a fold of" in caplog.text
    assert distill.main(["--config", yaml_path, "--verdict"]) == 2
    assert "--verdict and --student go together" in caplog.text
