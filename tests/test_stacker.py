"""lib/stacker.py on synthetic OOF logits (no training): the nested OOF is really nested (spied and
behavioural), early stopping stays inside the training folds, XGBoost learns class-dependent member errors a
mean cannot, the blend drops a noise member, stackers round-trip exactly and load without scikit-learn or
pandas, and many classes skip XGBoost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny import ROOT

from lib import stacker
from lib.config import Config

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
    """The member with the lowest log-loss, computed here independently of lib/stacker.py."""
    nll = [
        -(m - np.log(np.exp(m.astype(np.float64)).sum(1, keepdims=True)))[np.arange(len(y)), y].mean()
        for m in members
    ]
    return names[int(np.argmin(nll))]


def template(kind: str = "blend", **overrides) -> stacker.Stacker:
    """A stacker with small, fast XGBoost settings (one thread: the tests must not fight other work for the
    cores), built from the config keys as the stages build it."""
    features = overrides.pop("features", "logits")
    settings = {"workers": 1, "seed": 0, "xgb_rounds": 150, "xgb_eta": 0.15, "xgb_early_stop": 15}
    options = Config(**(settings | overrides)).stacker_options() | {"features": features}
    return stacker.Stacker(kind, **options)


# ---------------------------------------------------------------------------------------------------------
# Nesting.


@pytest.mark.parametrize("kind", stacker.KINDS)
def test_fold_k_is_predicted_by_a_stacker_that_never_saw_it(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    y, folds = layout(4, per=10)
    members = swapped_members(y)
    members[0][:, 0] = np.arange(len(y))  # column 0 of member 0 names the row, so the spy can see rows
    seen, predicted = [], []
    fit, predict = stacker.Stacker.fit, stacker.Stacker.predict_proba

    def spy_fit(self, ms, yy, ff=None, rounds=None):
        self.rows = set(ms[0][:, 0].astype(int).tolist())
        seen.append(self.rows)
        return fit(self, ms, yy, ff, rounds)

    def spy_predict(self, ms):
        rows = set(ms[0][:, 0].astype(int).tolist())
        assert not rows & self.rows, "a stacker predicted rows it was fitted on"
        predicted.append(rows)
        return predict(self, ms)

    monkeypatch.setattr(stacker.Stacker, "fit", spy_fit)
    monkeypatch.setattr(stacker.Stacker, "predict_proba", spy_predict)
    probs = stacker.nested_fits(template(kind), members, y, folds)[0]
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
    nested = stacker.nested_fits(template(kind), [a, b], y, folds)[0]
    acc_nested = float((nested[in0].argmax(1) == y[in0]).mean())
    acc_a = float((a[in0].argmax(1) == y[in0]).mean())
    leaky = template(kind).fit([a, b], y, rounds=100).predict_proba([a[in0], b[in0]])
    assert float((leaky.argmax(1) == y[in0]).mean()) > 0.95  # the leak is learnable when fold 0 is seen
    assert acc_nested < acc_a + 0.1 and acc_nested < 0.8


@pytest.mark.parametrize("n_folds", [3, 2])
def test_early_stopping_uses_only_training_fold_rows(n_folds: int, monkeypatch: pytest.MonkeyPatch) -> None:
    y, folds = layout(4, per=12, n_folds=n_folds)
    members = swapped_members(y)
    members[0][:, 0] = np.arange(len(y))
    calls = []
    boost = stacker._boost

    def spy(params, x, yy, rounds, x_val=None, y_val=None, early_stop=0):
        ids = lambda m: None if m is None else set(m[:, 0].astype(int).tolist())  # noqa: E731
        calls.append((ids(x), ids(x_val), rounds))
        return boost(params, x, yy, rounds, x_val, y_val, early_stop)

    monkeypatch.setattr(stacker, "_boost", spy)
    xgb = template("xgboost", xgb_rounds=120)
    nested = stacker.nested_fits(xgb, members, y, folds)[1]
    assert len(calls) == 2 * n_folds  # per outer fold: the early-stopping probe, then the refit
    for k in range(n_folds):
        outside_k = set(np.flatnonzero(folds != k).tolist())
        (train, val, max_rounds), (refit_rows, no_val, rounds) = calls[2 * k], calls[2 * k + 1]
        assert val and not train & val and train | val == outside_k  # the probe's split is inside the rest
        if n_folds > 2:  # a whole inner fold is held out; with two folds a seeded share of the one left
            assert any(val == set(np.flatnonzero(folds == j).tolist()) for j in range(n_folds) if j != k)
        assert max_rounds == xgb.max_rounds
        assert refit_rows == outside_k and no_val is None and rounds == nested[k].rounds <= xgb.max_rounds
    final = stacker.refit(xgb, members, y, folds, nested)
    assert final.rounds == round(float(np.median([s.rounds for s in nested])))
    assert calls[-1][1] is None and calls[-1][0] == set(range(len(y)))  # all OOF, the nested rounds


# ---------------------------------------------------------------------------------------------------------
# The combiners.


def test_xgboost_learns_class_dependent_errors_a_mean_cannot() -> None:
    y, folds = layout(4, per=40)
    members = swapped_members(y)
    table, _ = stacker.compare(members, y, folds, CLASSES, ["A", "B"], template=template())
    assert list(table.columns) == ["method", "accuracy", "macro_f1", "log_loss"]
    single = f"single ({best_name(members, y, ['A', 'B'])})"
    assert table["method"].tolist() == [single, "mean", "blend", "xgboost"]
    rows = table.set_index("method")
    assert rows.loc["xgboost", "accuracy"] > 0.9 > rows.loc["mean", "accuracy"] + 0.25
    assert rows.loc["xgboost", "log_loss"] < rows.loc["mean", "log_loss"] - 0.3
    assert stacker.choose(table) == "xgboost"
    assert stacker.choose(table, stacker="mean") == "mean"
    # Deterministic for a seed.
    again, _ = stacker.compare(members, y, folds, CLASSES, ["A", "B"], template=template())
    pd.testing.assert_frame_equal(table, again)


def test_blend_gives_a_noise_member_no_weight() -> None:
    y, _ = layout(4, per=60)
    rng = np.random.default_rng(2)
    good = [2 * onehot(y, 4) + rng.normal(size=(len(y), 4)) for _ in range(2)]
    noise = 3 * rng.normal(size=(len(y), 4))
    s = stacker.Stacker("blend").fit([good[0], noise, good[1]], y)
    assert s.weights[1] < 0.05  # the in-sample optimum: ~0.02 here (it fits a little of the noise)
    assert min(s.weights[0], s.weights[2]) > 0.3 and abs(sum(s.weights) - 1) < 1e-9
    mean = stacker.Stacker("mean").fit([good[0], noise, good[1]], y)
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
    assert stacker.Stacker("single").fit([weak, strong], y).member == 1
    logs = stacker.Stacker("mean", features="logits").fit([weak, strong], y).predict_proba([weak, strong])
    probs = stacker.Stacker("mean", features="probs").fit([weak, strong], y).predict_proba([weak, strong])
    sm = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(probs, (sm(weak) + sm(strong)) / 2, rtol=1e-9)
    np.testing.assert_allclose(logs, sm((np.log(sm(weak)) + np.log(sm(strong))) / 2), rtol=1e-9)


@pytest.mark.parametrize("features", ["logits", "probs"])
@pytest.mark.parametrize("kind", stacker.KINDS)
def test_save_load_round_trips_exactly(kind: str, features: str, tmp_path: Path) -> None:
    y, folds = layout(4, per=15)
    members = swapped_members(y)
    s = template(kind, features=features).fit(members, y, folds)
    files = s.save(tmp_path / "stacker")
    assert all(f.is_file() for f in files) and (len(files) == 2) == (kind == "xgboost")
    back = stacker.Stacker.load(tmp_path / "stacker")
    assert (back.kind, back.features, back.n_members) == (kind, features, 2)
    test = swapped_members(y[:25], seed=9)
    np.testing.assert_array_equal(back.predict_proba(test), s.predict_proba(test))
    np.testing.assert_allclose(back.predict_proba(test).sum(1), 1, rtol=1e-9)
    with pytest.raises(stacker.StackError, match="fitted on 2 member"):
        back.predict_proba(test[:1])


def test_a_saved_stacker_loads_and_predicts_without_sklearn_or_pandas(tmp_path: Path) -> None:
    y, folds = layout(4, per=15)
    members = swapped_members(y)
    for kind in stacker.KINDS:
        s = template(kind).fit(members, y, folds)
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
from lib import stacker
root = Path({str(tmp_path)!r})
members = list(np.load(root / "members.npy"))
for kind in stacker.KINDS:
    got = stacker.Stacker.load(root / kind).predict_proba(members)
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
    assert Config().stack_max_classes == template().max_classes == 50  # the documented default threshold
    table, _ = stacker.compare(members, y, folds, classes, ["A", "B"], template=template())
    assert [m.split(" ")[0] for m in table["method"]] == ["single", "mean", "blend"]
    assert stacker.choose(table) in {"single", "mean", "blend"}
    assert stacker.choose(table) == stacker.KINDS[int(np.argmin(table["log_loss"]))]
    with pytest.raises(stacker.StackError, match="stack_max_classes"):
        stacker.choose(table, stacker="xgboost")
    with pytest.raises(stacker.StackError, match=r"stack_max_classes \(50\) classes: 60"):
        template("xgboost").fit(members, y, folds)
    # Raising the threshold brings the XGBoost row back.
    more = template(stack_max_classes=60, xgb_rounds=3)
    assert "xgboost" in stacker.compare(members, y, folds, classes, ["A", "B"], template=more)[0]["method"].tolist()


