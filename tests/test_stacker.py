"""lib/stacker.py on synthetic OOF logits (no training): the nested OOF is really nested (spied and
behavioural), early stopping stays inside the training folds, XGBoost learns class-dependent member errors a
mean cannot, the blend drops a noise member, stackers round-trip exactly and load without scikit-learn or
pandas, many classes skip multi-class XGBoost, and the candidate re-ranker (any class count): beats the mean
where members err by class, never reads the validation fold's labels, gives finite calibrated probabilities,
works on TopK members and allocates nothing N x C at 20,000 classes."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny import ROOT

from lib import stacker
from lib.config import Config
from lib.oof import TopK

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


@pytest.mark.parametrize("kind", ["xgboost", "blend", "rerank"])
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


@pytest.mark.parametrize("n_folds", [3, 2])
def test_rerank_early_stops_and_calibrates_inside_the_training_folds(
    n_folds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-ranker's rows are (image, candidate) pairs: its boosters' query ids name the images, and its
    temperature is fitted on the probe's held-out images only."""
    y, folds = layout(4, per=12, n_folds=n_folds)
    members = swapped_members(y)
    boosts, calibrated = [], []
    boost, calibrate = stacker._boost, stacker.Stacker._calibrate

    def spy_boost(params, x, yy, rounds, x_val=None, y_val=None, early_stop=0, *, qid=None, qid_val=None):
        boosts.append((set(qid.tolist()), None if qid_val is None else set(qid_val.tolist()), rounds, early_stop))
        return boost(params, x, yy, rounds, x_val, y_val, early_stop, qid=qid, qid_val=qid_val)

    def spy_calibrate(self, probe, rounds, calib):
        calibrated.append(set(calib[0].tolist()))
        return calibrate(self, probe, rounds, calib)

    monkeypatch.setattr(stacker, "_boost", spy_boost)
    monkeypatch.setattr(stacker.Stacker, "_calibrate", spy_calibrate)
    rr = template("rerank", xgb_rounds=120)
    nested = stacker.nested_fits(rr, members, y, folds)[1]
    assert len(boosts) == 2 * n_folds
    for k in range(n_folds):
        rows = np.flatnonzero(folds != k)  # the fit sees these rows as 0..len-1
        (train, val, max_rounds, stop), (refit_rows, no_val, rounds, _) = boosts[2 * k], boosts[2 * k + 1]
        assert val and not train & val and train | val == set(range(len(rows)))
        if n_folds > 2:  # a whole inner fold of the fitting rows
            assert any(val == set(np.flatnonzero(folds[rows] == j).tolist()) for j in range(n_folds) if j != k)
        assert (max_rounds, stop) == (rr.max_rounds, rr.early_stop)
        assert refit_rows == set(range(len(rows))) and no_val is None and rounds == nested[k].rounds
        assert calibrated[k] == val  # the temperature: the probe on the held-out images (4 classes: all covered)
    final = stacker.refit(rr, members, y, folds, nested)
    assert final.rounds == round(float(np.median([s.rounds for s in nested])))
    assert final.temperature == pytest.approx(float(np.median([s.temperature for s in nested])))
    assert boosts[-1][1] is None and boosts[-1][0] == set(range(len(y)))  # no probe: all OOF, fixed rounds


# ---------------------------------------------------------------------------------------------------------
# The combiners.


def test_xgboost_learns_class_dependent_errors_a_mean_cannot() -> None:
    y, folds = layout(4, per=40)
    members = swapped_members(y)
    table, _ = stacker.compare(members, y, folds, CLASSES, ["A", "B"], template=template())
    assert list(table.columns) == ["method", "accuracy", "macro_f1", "log_loss"]
    single = f"single ({best_name(members, y, ['A', 'B'])})"
    assert table["method"].tolist() == [single, "mean", "blend", "xgboost", "rerank"]
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
    assert all(f.is_file() for f in files) and (len(files) == 2) == (kind in ("xgboost", "rerank"))
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
    tops = [TopK.from_logits(m, 2) for m in members]
    topk = stacker.Stacker.load(tmp_path / "rerank").predict_topk(tops)
    np.savez(tmp_path / "topk.npz", index=topk.index, values=topk.values, rest=topk.rest)
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
from lib.oof import TopK
root = Path({str(tmp_path)!r})
members = list(np.load(root / "members.npy"))
for kind in stacker.KINDS:
    got = stacker.Stacker.load(root / kind).predict_proba(members)
    assert np.array_equal(got, np.load(root / f"{{kind}}.npy")), kind
topk = stacker.Stacker.load(root / "rerank").predict_topk([TopK.from_logits(m, 2) for m in members])
want = np.load(root / "topk.npz")
assert all(np.array_equal(getattr(topk, key), want[key]) for key in ("index", "values", "rest"))
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
    kinds = [m.split(" ")[0] for m in table["method"]]
    assert kinds == ["single", "mean", "blend", "rerank"]
    assert stacker.choose(table) == kinds[int(np.argmin(table["log_loss"]))]
    with pytest.raises(stacker.StackError, match=r"stack_max_classes.*rerank"):
        stacker.choose(table, stacker="xgboost")
    with pytest.raises(stacker.StackError, match=r"stack_max_classes \(50\) classes: 60"):
        template("xgboost").fit(members, y, folds)
    # Raising the threshold brings the XGBoost row back.
    more = template(stack_max_classes=60, xgb_rounds=3)
    assert "xgboost" in stacker.compare(members, y, folds, classes, ["A", "B"], template=more)[0]["method"].tolist()




# ---------------------------------------------------------------------------------------------------------
# The candidate re-ranker at many classes.


def complementary_members(
    n_classes: int = 200, n: int = 1200, head: int = 20, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Two members whose errors depend on the class: half the images belong to ``head`` frequent classes,
    half to the other (rare) ones; member A is confidently right on head classes and names a random class on
    rare ones, member B the reverse (as a naturally sampled and a class-balanced model might). A mean is a
    coin flip and a blend's global weights cannot follow the class; "trust A when its answer is a frequent
    class" is right ~90% of the time, and the re-ranker sees each candidate's training frequency.
    Returns (members float32 [N, C], y, folds)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_classes)  # frequency unrelated to the class index
    prior = np.where(np.arange(n_classes) < head, 0.5 / head, 0.5 / (n_classes - head))
    y = order[rng.choice(n_classes, size=n, p=prior)]
    in_head = np.isin(y, order[:head])
    members = []
    for right in (in_head, ~in_head):
        answer = np.where(right, y, rng.integers(0, n_classes, size=n))
        members.append((4 * onehot(answer, n_classes) + rng.normal(size=(n, n_classes))).astype(np.float32))
    return members, y, np.arange(n) % 3


@pytest.mark.parametrize("objective", stacker.OBJECTIVES)
def test_rerank_learns_class_dependent_errors_at_200_classes(objective: str) -> None:
    """Multi-class XGBoost is off at 200 classes; the re-ranker on the members' top-20 (given as TopK) is
    compared in the nested table and wins by far. Both XGBoost forms work; binary:logistic (the default)
    scored best here (nested log-loss 0.62 vs 0.65 pairwise, 0.67 ndcg)."""
    members, y, folds = complementary_members()
    tops = [TopK.from_logits(m, 20) for m in members]
    classes = [f"c{i:03d}" for i in range(200)]
    rr = template(stack_rerank_objective=objective)
    table, fits = stacker.compare(tops, y, folds, classes, ["A", "B"], template=rr)
    rows = table.set_index(table["method"].str.split(" ").str[0])
    assert rows.index.tolist() == ["single", "mean", "blend", "rerank"]
    assert rows.loc["rerank", "accuracy"] > 0.8 > 0.6 > rows.loc["mean", "accuracy"]
    assert rows.loc["rerank", "accuracy"] > rows.loc["blend", "accuracy"] + 0.3
    assert rows.loc["rerank", "log_loss"] < min(rows.loc["mean", "log_loss"], rows.loc["blend", "log_loss"]) - 1.0
    assert stacker.choose(table) == "rerank"
    nested = fits["rerank"][0]
    assert isinstance(nested, TopK) and nested.k == 40  # the union of two top-20, never [N, 200]
    if objective == "binary:logistic":  # the re-ranker takes each dense member's top 20 itself: same result
        dense = stacker.nested_fits(template("rerank"), members, y, folds)[0]
        np.testing.assert_allclose(dense, stacker._dense_probs(nested), rtol=1e-5, atol=1e-12)  # float32 TopK


def test_rerank_never_reads_the_validation_folds_labels() -> None:
    """Relabelling fold 0 changes the stackers fitted on it (folds 1 and 2 are predicted differently) but not
    one number of fold 0's nested prediction: the class frequencies, the none-of-the-candidates mass, the early
    stopping and the temperature of the stacker predicting fold 0 all come from folds 1 and 2."""
    members, y, folds = complementary_members(n=600)
    tops = [TopK.from_logits(m, 20) for m in members]
    relabelled = y.copy()
    in0 = folds == 0
    relabelled[in0] = np.random.default_rng(5).integers(0, 200, size=in0.sum())
    a, fitted = stacker.nested_fits(template("rerank"), tops, y, folds)
    b, _ = stacker.nested_fits(template("rerank"), tops, relabelled, folds)
    for key in ("index", "values", "rest"):
        np.testing.assert_array_equal(getattr(a, key)[in0], getattr(b, key)[in0])
    assert not np.array_equal(a.values[~in0], b.values[~in0])
    np.testing.assert_array_equal(fitted[0].class_counts, np.bincount(y[~in0], minlength=200))


def test_a_fitting_rows_class_frequency_ignores_its_own_label() -> None:
    """In training, a candidate's class frequency is counted over the other folds of the fitting rows, so
    no row's own label enters its features. A leave-one-out count would show every true candidate as
    count - 1, a tell trees learn perfectly (seen here: the nested accuracy fell to chance), and in-sample
    counts would teach that a class absent from training is never right."""
    members, y, folds = complementary_members(n=300)
    s = template("rerank", xgb_rounds=5, xgb_early_stop=0).fit(members, y, folds, temperature=1.0)
    fr = stacker.Frame.union(s._rerank_tops(members))
    seen = []
    rerank_x = stacker.Stacker._rerank_x

    def spy(self, fr, img, col, oof=None):
        x = rerank_x(self, fr, img, col, oof)
        seen.append((oof is not None, fr.cand[img, col], img, x[:, -1]))
        return x

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stacker.Stacker, "_rerank_x", spy)
        template("rerank", xgb_rounds=5, xgb_early_stop=0).fit(members, y, folds, temperature=1.0)
    training, cls, img, freq = seen[0]
    assert training
    other = [np.bincount(y[folds != f], minlength=200) / (folds != f).sum() for f in range(3)]
    np.testing.assert_allclose(freq, np.array(other)[folds[img], cls], rtol=1e-6)
    img, col = np.nonzero(fr.valid())
    scoring = s._rerank_x(fr, img, col)[:, -1]  # unseen images: the counts over all fitting rows
    np.testing.assert_allclose(scoring, np.bincount(y, minlength=200)[fr.cand[img, col]] / len(y), rtol=1e-6)


def test_rerank_probabilities_sum_to_one_and_never_zero_the_truth() -> None:
    """Rows whose truth is outside every member's top k still get a positive probability: the
    none-of-the-candidates mass, whose mean over the fitting rows is the rate at which the truth escapes."""
    members, y, folds = complementary_members(n=600)
    rng = np.random.default_rng(1)  # noisier members' top-3: the truth often escapes the candidates
    tops = [TopK.from_logits(m + rng.normal(scale=1.2, size=m.shape), 3) for m in members]
    s = template("rerank").fit(tops, y, folds)
    fr = stacker.Frame.union(s._rerank_tops(tops))
    missed = ~fr.covered(y)
    assert 0.1 < missed.mean() < 0.6
    q = stacker._none_mass(fr, s.none_coef)
    assert abs(q.mean() - missed.mean()) < 0.01  # calibrated in the large, as a logistic fit with intercept
    p = s.predict_proba(tops)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-9)
    truth = p[np.arange(len(y)), y]
    assert truth.min() > 0
    shared = q / (200 - fr.n_cand)  # a missed truth gets its share of the none mass
    np.testing.assert_allclose(truth[missed], shared[missed], rtol=1e-9)
    np.testing.assert_allclose(stacker._dense_probs(s.predict_topk(tops)), p, rtol=1e-12)
    assert np.isfinite(stacker.scores(s.predict_topk(tops), y, 200)["log_loss"])


def test_mean_and_blend_on_topk_members_are_the_dense_ones_on_their_spread() -> None:
    """On TopK members, mean and blend work on the candidate union without [N, C]; what they compute is
    exactly the dense combiner on TopK.dense() (the rest spread evenly)."""
    members, y, _ = complementary_members(n=300)
    tops = [TopK.from_logits(m, 10) for m in members]
    spread = [t.dense() for t in tops]
    for kind, features in [("mean", "logits"), ("mean", "probs"), ("blend", "logits"), ("single", "logits")]:
        on_top = template(kind, features=features).fit(tops, y)
        on_dense = template(kind, features=features).fit(spread, y)
        if kind == "blend":
            np.testing.assert_allclose(on_top.weights, on_dense.weights, atol=1e-5)
            assert on_top.temperature == pytest.approx(on_dense.temperature, rel=1e-5)
        got = on_top.predict_topk(tops)
        assert isinstance(got, TopK) and got.k == (10 if kind == "single" else 20)
        want = on_dense.predict_proba(spread)
        np.testing.assert_allclose(stacker._dense_probs(got), want, rtol=1e-4, atol=1e-12)


def test_chunks_of_images_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames are built a chunk of images at a time (bounded memory at any N): with chunks of a few images
    the nested re-ranker and blend, and a fitted re-ranker's TopK, are what one chunk gives."""
    members, y, folds = complementary_members(n=300)
    tops = [TopK.from_logits(m, 20) for m in members]
    whole = {kind: stacker.nested_fits(template(kind), tops, y, folds)[0] for kind in ("rerank", "blend")}
    monkeypatch.setattr(stacker, "FRAME_CELLS", 700)  # 8 images per chunk
    assert len(stacker._chunks(len(y), stacker._frame_cells(tops))) == 38
    for kind, want in whole.items():
        got = stacker.nested_fits(template(kind), tops, y, folds)[0]
        np.testing.assert_array_equal(got.index, want.index)
        np.testing.assert_allclose(got.values, want.values, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.rest, want.rest, rtol=1e-6)


def random_topk(y: np.ndarray, n_classes: int, k: int, hit: float, rng: np.random.Generator) -> TopK:
    """A TopK made without [N, C]: k distinct classes per row other than the truth, then the truth as top-1
    in a ``hit`` share of the rows; descending logits, and a rest for the others."""
    n = len(y)
    offsets = np.stack([rng.choice(n_classes - 1, size=k, replace=False) + 1 for _ in range(n)])
    index = (y[:, None] + offsets) % n_classes
    found = rng.random(n) < hit
    index[found, 0] = y[found]
    values = np.sort(rng.normal(size=(n, k)), axis=1)[:, ::-1] + 2
    return TopK(index.astype(np.int32), values.astype(np.float32), np.full(n, 2.0, np.float32), n_classes)


def test_no_n_by_c_array_at_20000_classes() -> None:
    """The whole comparison, choice, final fit and a TopK prediction on 600 images x 20,000 classes x 2 TopK
    members: numpy's peak allocation stays below one byte per image x class (12 MB)."""
    n, c = 600, 20_000
    rng = np.random.default_rng(7)
    y, folds = rng.integers(0, c, size=n), np.arange(n) % 3
    tops = [random_topk(y, c, 20, hit, rng) for hit in (0.6, 0.5)]
    classes = [f"c{i}" for i in range(c)]
    tracemalloc.start()
    try:
        result = stacker.fit_stacker(tops, y, folds, classes, ["A", "B"], template=template(), choice="rerank")
        out = result.final.predict_topk(tops)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.table["method"].str.split(" ").str[0].tolist() == ["single", "mean", "blend", "rerank"]
    assert isinstance(result.nested, TopK) and isinstance(out, TopK) and out.k == 40
    assert peak < n * c, f"peak {peak / 1e6:.1f} MB: something made an [N, C] array"


def test_candidate_sets_of_different_sizes_calibrate_as_their_own_softmax() -> None:
    """The re-ranker's temperature: images with 2, 3 and 4 candidates (rows unordered), padded to one matrix;
    the -inf padding changes no softmax, so T is the one minimising each image's own candidate log-loss."""
    from scipy.optimize import minimize_scalar

    from lib.metrics import fit_temperature

    rng = np.random.default_rng(0)
    counts = rng.integers(2, 5, 400)
    img = np.repeat(np.arange(len(counts)), counts)
    scores = rng.normal(size=len(img)) * 3.0
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    truth = np.zeros(len(img), bool)
    truth[first + rng.integers(0, counts)] = True
    truth[img < 5] = False  # five images without their truth among the candidates: left out
    order = rng.permutation(len(img))
    matrix, label = stacker._candidate_matrix(scores[order], img[order], truth[order])
    assert matrix.shape == (395, 4) and np.isinf(matrix).sum() == 4 * 395 - counts[5:].sum()

    def loss(t: float) -> float:
        keep = np.isin(img, np.arange(5, len(counts)))
        s, i = scores[keep] / t, img[keep]
        lse = np.array([np.logaddexp.reduce(s[i == k]) for k in np.unique(i)])
        return float((lse - s[truth[keep]]).mean())

    want = minimize_scalar(loss, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-6}).x
    assert fit_temperature(matrix, label) == pytest.approx(want, rel=1e-3)
