"""stack.py on synthetic OOF logits (no training): the nested OOF is really nested (spied and behavioural),
early stopping stays inside the training folds, XGBoost learns class-dependent member errors a mean cannot,
the blend drops a noise member, stackers round-trip exactly and load without scikit-learn or pandas, many
classes skip XGBoost, mixed folds are refused by name, and the CLI's oof.npz is accepted by report.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny import ROOT, write_yaml

import report
import stack
from lib.config import Config
from lib.oof import aligned, read_oof, write_oof

CLASSES = ["1", "NA", "a/b c", "z"]  # already sorted; names that must stay strings


def make_cfg(tmp: Path | None = None, **overrides) -> Config:
    """Small, fast XGBoost settings (one thread: the tests must not fight other work for the cores)."""
    settings = {"workers": 1, "seed": 0, "xgb_rounds": 150, "xgb_eta": 0.15, "xgb_early_stop": 15}
    if tmp is not None:
        settings |= {"output_dir": str(tmp / "output"), "folds_csv": str(tmp / "folds.csv")}
    return Config(**(settings | overrides))


def layout(n_classes: int, per: int = 30, n_folds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Class index and fold id of each row: ``per`` images of every class in every fold."""
    y = np.tile(np.repeat(np.arange(n_classes), per), n_folds)
    return y, np.repeat(np.arange(n_folds), n_classes * per)


def onehot(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[y]


def swapped_members(y: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Two confident members with class-dependent errors: A swaps classes 2<->3, B swaps 0<->1. Each is right
    where the other is wrong, so a mean is a coin flip on every class, while "trust A when A says 0 or 1,
    else B" is right almost always: a stacker can learn that rule."""
    rng = np.random.default_rng(seed)
    a = 3 * onehot(np.array([0, 1, 3, 2])[y], 4) + rng.normal(size=(len(y), 4))
    b = 3 * onehot(np.array([1, 0, 2, 3])[y], 4) + rng.normal(size=(len(y), 4))
    return [a.astype(np.float32), b.astype(np.float32)]


def best_name(members: list[np.ndarray], y: np.ndarray, names: list[str]) -> str:
    """The member with the lowest log-loss, computed here independently of stack.py."""
    nll = [
        -(m - np.log(np.exp(m.astype(np.float64)).sum(1, keepdims=True)))[np.arange(len(y)), y].mean()
        for m in members
    ]
    return names[int(np.argmin(nll))]


def write_folds(root: Path, y: np.ndarray, folds: np.ndarray, classes: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({
        "image": [f"img {i}.png" for i in range(len(y))], "label": np.asarray(classes)[y],
        "group": np.arange(len(y)), "fold": folds,
    })  # fmt: skip
    df.to_csv(root / "folds.csv", index=False)
    return df


def write_member(cfg: Config, name: str, df: pd.DataFrame, logits: np.ndarray, classes: list[str]) -> Path:
    """OOF logits written in a shuffled row order: stacking must match images by name."""
    path = Path(cfg.output_dir) / name / "oof.npz"
    order = np.random.default_rng(len(name)).permutation(len(df))
    write_oof(path, df.iloc[order], logits[order], classes)
    return path


# ---------------------------------------------------------------------------------------------------------
# Nesting.


@pytest.mark.parametrize("kind", stack.KINDS)
def test_fold_k_is_predicted_by_a_stacker_that_never_saw_it(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    y, folds = layout(4, per=10)
    members = swapped_members(y)
    members[0][:, 0] = np.arange(len(y))  # column 0 of member 0 names the row, so the spy can see rows
    seen, predicted = [], []
    fit, predict = stack.Stacker.fit, stack.Stacker.predict_proba

    def spy_fit(self, ms, yy, ff=None, rounds=None):
        self.rows = set(ms[0][:, 0].astype(int).tolist())
        seen.append(self.rows)
        return fit(self, ms, yy, ff, rounds)

    def spy_predict(self, ms):
        rows = set(ms[0][:, 0].astype(int).tolist())
        assert not rows & self.rows, "a stacker predicted rows it was fitted on"
        predicted.append(rows)
        return predict(self, ms)

    monkeypatch.setattr(stack.Stacker, "fit", spy_fit)
    monkeypatch.setattr(stack.Stacker, "predict_proba", spy_predict)
    probs = stack.nested_oof(kind, members, y, folds, make_cfg())
    assert predicted == [set(np.flatnonzero(folds == k).tolist()) for k in range(3)]
    assert seen == [set(np.flatnonzero(folds != k).tolist()) for k in range(3)]
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-9)


@pytest.mark.parametrize("kind", ["xgboost", "blend"])
def test_a_label_leak_in_one_fold_cannot_help_that_fold(kind: str) -> None:
    """Member B leaks the label in fold 0 only and is noise elsewhere. A stacker that saw fold 0 would trust B
    there (shown: ~100%); the nested one learnt on folds 1-2 that B is noise, so fold 0 gets A's accuracy."""
    y, folds = layout(4, per=30)
    rng = np.random.default_rng(1)
    a = (1.0 * onehot(y, 4) + rng.normal(size=(len(y), 4))).astype(np.float32)
    b = rng.normal(size=(len(y), 4)).astype(np.float32)
    in0 = folds == 0
    b[in0] = 5 * onehot(y[in0], 4)
    cfg = make_cfg()
    nested = stack.nested_oof(kind, [a, b], y, folds, cfg)
    acc_nested = float((nested[in0].argmax(1) == y[in0]).mean())
    acc_a = float((a[in0].argmax(1) == y[in0]).mean())
    leaky = stack.Stacker(kind, "logits", cfg).fit([a, b], y, rounds=100).predict_proba([a[in0], b[in0]])
    assert float((leaky.argmax(1) == y[in0]).mean()) > 0.95  # the leak is learnable when fold 0 is seen
    assert acc_nested < acc_a + 0.1 and acc_nested < 0.8


@pytest.mark.parametrize("n_folds", [3, 2])
def test_early_stopping_uses_only_training_fold_rows(n_folds: int, monkeypatch: pytest.MonkeyPatch) -> None:
    y, folds = layout(4, per=12, n_folds=n_folds)
    members = swapped_members(y)
    members[0][:, 0] = np.arange(len(y))
    calls = []
    boost = stack._boost

    def spy(params, x, yy, rounds, x_val=None, y_val=None, early_stop=0):
        ids = lambda m: None if m is None else set(m[:, 0].astype(int).tolist())  # noqa: E731
        calls.append((ids(x), ids(x_val), rounds))
        return boost(params, x, yy, rounds, x_val, y_val, early_stop)

    monkeypatch.setattr(stack, "_boost", spy)
    cfg = make_cfg(xgb_rounds=120)
    nested = stack.nested_fits("xgboost", members, y, folds, cfg)[1]
    assert len(calls) == 2 * n_folds  # per outer fold: the early-stopping probe, then the refit
    for k in range(n_folds):
        outside_k = set(np.flatnonzero(folds != k).tolist())
        (train, val, max_rounds), (refit_rows, no_val, rounds) = calls[2 * k], calls[2 * k + 1]
        assert val and not train & val and train | val == outside_k  # the probe's split is inside the rest
        if n_folds > 2:  # a whole inner fold is held out; with two folds a seeded share of the one left
            assert any(val == set(np.flatnonzero(folds == j).tolist()) for j in range(n_folds) if j != k)
        assert max_rounds == cfg.xgb_rounds
        assert refit_rows == outside_k and no_val is None and rounds == nested[k].rounds <= cfg.xgb_rounds
    final = stack.refit("xgboost", members, y, folds, cfg, nested)
    assert final.rounds == round(float(np.median([s.rounds for s in nested])))
    assert calls[-1][1] is None and calls[-1][0] == set(range(len(y)))  # all OOF, the nested rounds


# ---------------------------------------------------------------------------------------------------------
# The combiners.


def test_xgboost_learns_class_dependent_errors_a_mean_cannot() -> None:
    y, folds = layout(4, per=40)
    members = swapped_members(y)
    cfg = make_cfg()
    table = stack.compare(members, y, folds, CLASSES, cfg, ["A", "B"])
    assert list(table.columns) == ["method", "accuracy", "macro_f1", "log_loss"]
    single = f"single ({best_name(members, y, ['A', 'B'])})"
    assert table["method"].tolist() == [single, "mean", "blend", "xgboost"]
    rows = table.set_index("method")
    assert rows.loc["xgboost", "accuracy"] > 0.9 > rows.loc["mean", "accuracy"] + 0.25
    assert rows.loc["xgboost", "log_loss"] < rows.loc["mean", "log_loss"] - 0.3
    assert stack.choose(table, cfg) == "xgboost"
    assert stack.choose(table, make_cfg(stacker="mean")) == "mean"
    # Deterministic for a seed.
    again = stack.compare(members, y, folds, CLASSES, cfg, ["A", "B"])
    pd.testing.assert_frame_equal(table, again)


def test_blend_gives_a_noise_member_no_weight() -> None:
    y, _ = layout(4, per=60)
    rng = np.random.default_rng(2)
    good = [2 * onehot(y, 4) + rng.normal(size=(len(y), 4)) for _ in range(2)]
    noise = 3 * rng.normal(size=(len(y), 4))
    s = stack.Stacker("blend").fit([good[0], noise, good[1]], y)
    assert s.weights[1] < 0.05  # the in-sample optimum: ~0.02 here (it fits a little of the noise)
    assert min(s.weights[0], s.weights[2]) > 0.3 and abs(sum(s.weights) - 1) < 1e-9
    mean = stack.Stacker("mean").fit([good[0], noise, good[1]], y)
    nll = lambda p: -np.log(p[np.arange(len(y)), y]).mean()  # noqa: E731
    assert nll(s.predict_proba([good[0], noise, good[1]])) < nll(
        mean.predict_proba([good[0], noise, good[1]])
    )


def test_single_takes_the_lowest_log_loss_member_and_mean_follows_the_features() -> None:
    y, _ = layout(3, per=20)
    rng = np.random.default_rng(3)
    weak, strong = (
        onehot(y, 3) + rng.normal(size=(len(y), 3)),
        3 * onehot(y, 3) + rng.normal(size=(len(y), 3)),
    )
    assert stack.Stacker("single").fit([weak, strong], y).member == 1
    logs = stack.Stacker("mean", "logits").fit([weak, strong], y).predict_proba([weak, strong])
    probs = stack.Stacker("mean", "probs").fit([weak, strong], y).predict_proba([weak, strong])
    sm = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(probs, (sm(weak) + sm(strong)) / 2, rtol=1e-9)
    np.testing.assert_allclose(logs, sm((np.log(sm(weak)) + np.log(sm(strong))) / 2), rtol=1e-9)


@pytest.mark.parametrize("features", ["logits", "probs"])
@pytest.mark.parametrize("kind", stack.KINDS)
def test_save_load_round_trips_exactly(kind: str, features: str, tmp_path: Path) -> None:
    y, folds = layout(4, per=15)
    members = swapped_members(y)
    s = stack.Stacker(kind, features, make_cfg()).fit(members, y, folds)
    files = s.save(tmp_path / "stacker")
    assert all(f.is_file() for f in files) and (len(files) == 2) == (kind == "xgboost")
    back = stack.Stacker.load(tmp_path / "stacker")
    assert (back.kind, back.features, back.n_members) == (kind, features, 2)
    test = swapped_members(y[:25], seed=9)
    np.testing.assert_array_equal(back.predict_proba(test), s.predict_proba(test))
    np.testing.assert_allclose(back.predict_proba(test).sum(1), 1, rtol=1e-9)
    with pytest.raises(stack.StackError, match="fitted on 2 member"):
        back.predict_proba(test[:1])


def test_a_saved_stacker_loads_and_predicts_without_sklearn_or_pandas(tmp_path: Path) -> None:
    y, folds = layout(4, per=15)
    members = swapped_members(y)
    for kind in stack.KINDS:
        s = stack.Stacker(kind, "logits", make_cfg()).fit(members, y, folds)
        s.save(tmp_path / kind)
        np.save(tmp_path / f"{kind}.npy", s.predict_proba(members))
    np.save(tmp_path / "members.npy", np.stack(members))
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sklearn", "pandas"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(ROOT / "src")!r})
from pathlib import Path
import numpy as np
import stack
root = Path({str(tmp_path)!r})
members = list(np.load(root / "members.npy"))
for kind in stack.KINDS:
    got = stack.Stacker.load(root / kind).predict_proba(members)
    assert np.array_equal(got, np.load(root / f"{{kind}}.npy")), kind
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_many_classes_skip_xgboost_and_auto_still_chooses() -> None:
    y, folds = layout(60, per=4)
    rng = np.random.default_rng(4)
    members = [2 * onehot(y, 60) + rng.normal(size=(len(y), 60)) for _ in range(2)]
    classes = [f"c{i:02d}" for i in range(60)]
    cfg = make_cfg()
    assert cfg.stack_max_classes == 50  # the documented default threshold
    table = stack.compare(members, y, folds, classes, cfg, ["A", "B"])
    assert [stack._kind(m) for m in table["method"]] == ["single", "mean", "blend"]
    assert stack.choose(table, cfg) in {"single", "mean", "blend"}
    assert stack.choose(table, cfg) == stack.KINDS[int(np.argmin(table["log_loss"]))]
    with pytest.raises(stack.StackError, match="stack_max_classes"):
        stack.choose(table, make_cfg(stacker="xgboost"))
    with pytest.raises(stack.StackError, match=r"stack_max_classes \(50\) classes: 60"):
        stack.Stacker("xgboost", "logits", cfg).fit(members, y, folds)
    # Raising the threshold brings the XGBoost row back.
    assert (
        "xgboost"
        in stack.compare(
            members, y, folds, classes, make_cfg(stack_max_classes=60, xgb_rounds=3), ["A", "B"]
        )["method"].tolist()
    )


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
    (old.parent / stack.MARKER).write_text("{}")
    return cfg, df, members


def test_load_members_aligns_by_image_name(project) -> None:
    cfg, df, members = project
    assert stack.find_members(cfg) == ["a", "b"]  # old_stack carries stack.json: never a member
    got, y, folds, classes = stack.load_members(cfg, ["b", "a"])
    np.testing.assert_array_equal(got[0], members[1])
    np.testing.assert_array_equal(got[1], members[0])
    assert classes == CLASSES and y.tolist() == layout(4, per=25)[0].tolist()
    assert folds.tolist() == df["fold"].tolist()


def test_mixed_folds_are_refused_naming_the_member(project, caplog: pytest.LogCaptureFixture) -> None:
    cfg, df, members = project
    moved = df.copy()
    i, j = df.index[df["fold"] == 0][0], df.index[df["fold"] == 1][0]
    moved.loc[[i, j], "fold"] = moved.loc[[j, i], "fold"].to_numpy()
    write_member(cfg, "stale", moved, members[0], CLASSES)
    with pytest.raises(stack.StackError, match=r"member 'stale' does not share .*another fold id"):
        stack.load_members(cfg, ["a", "stale"])
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
        "stacker/stacker.json",
    ):
        assert (out / name).is_file(), name
    state = json.loads((out / "stack.json").read_text())
    assert state["members"] == ["a", "b"] and state["classes"] == CLASSES and state["kind"] == "xgboost"
    assert (out / "stacker" / "xgb_model.ubj").is_file()
    printed = capsys.readouterr().out
    single = f"single ({best_name(members, layout(4, per=25)[0], ['a', 'b'])})"
    assert "| xgboost **(chosen)** |" in printed and f"| {single} |" in printed

    csv = pd.read_csv(out / "stack_report.csv")
    assert csv["method"].tolist() == ["a", "b", single, "mean", "blend", "xgboost"]
    assert csv["chosen"].tolist() == [False] * 5 + [True]
    # oof.npz holds the chosen stacker's nested OOF log-probabilities, aligned with folds.csv.
    m, y, folds, _ = stack.load_members(cfg, ["a", "b"])
    nested = stack.nested_oof("xgboost", m, y, folds, cfg)
    saved, classes = aligned(out / "oof.npz", df)
    assert classes == CLASSES
    np.testing.assert_allclose(np.exp(saved.astype(np.float64)), nested, rtol=1e-5, atol=1e-7)
    assert csv.loc[5, "accuracy"] == pytest.approx(float((nested.argmax(1) == y).mean()))
    final = stack.Stacker.load(out / "stacker")
    assert final.rounds > 0 and final.predict_proba(m).shape == (len(y), 4)

    # report.py scores the stack like any experiment.
    assert report.main(["--config", str(yaml)]) == 0
    table = pd.read_csv(tmp_path / "output" / "report" / "report.csv")
    row = table[(table["exp"] == "stack") & (table["fold"] == "all")].iloc[0]
    assert row["accuracy"] == pytest.approx(csv.loc[5, "accuracy"])
    assert row["log_loss"] == pytest.approx(csv.loc[5, "log_loss"], rel=1e-4)

    # A re-run replaces the whole folder (no stale model file) and leaves no staging folder.
    blend = write_yaml(make_cfg(tmp_path, stacker="blend"), tmp_path / "blend.yaml")
    assert stack.main(["--config", str(blend)]) == 0
    assert json.loads((out / "stack.json").read_text())["kind"] == "blend"
    assert not (out / "stacker" / "xgb_model.ubj").exists()
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == [
        "a",
        "b",
        "old_stack",
        "report",
        "stack",
    ]
    assert read_oof(out / "oof.npz")["logits"].dtype == np.float32
