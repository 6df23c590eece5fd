"""The per-class logit bias (lib/bias.py): fitted on OOF log-probabilities for macro-F1, checked nested,
shipped by package.py in the manifest and applied by predict.py.

Synthetic OOF (no images): 3 Gaussian classes in 2-D with a long tail (70% / 25% / 5%), scored by their
Bayes posteriors with the tail class's log-probability pushed down (an under-confident tail, as a model
trained on skewed labels gives), so that the tail class is never predicted. The end-to-end check packs the
tiny experiments of test_package.py.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from test_package import packaged_bundle, trained_experiments
from tiny import CLASSES

import package
import predict
from lib import bundle
from lib.bias import apply_class_bias, fit_class_bias, fit_offsets, stored_offsets, summary
from lib.config import Config
from lib.metrics import log_softmax
from lib.oof import TopK
from lib.stacker import StackResult

MEANS = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 1.6]])
SHARES = (0.7, 0.25, 0.05)


def skewed(n: int = 3000, seed: int = 0, under: float = 4.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probabilities float64 [n, 3], labels int [n], 5 folds int [n]): the tail class's log-probability
    lowered by ``under`` (0: the calibrated posterior)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=SHARES)
    x = MEANS[y] + rng.normal(size=(n, 2))
    scores = -0.5 * ((x[:, None] - MEANS[None]) ** 2).sum(-1) + np.log(SHARES)
    scores[:, 2] -= under
    return log_softmax(scores), y, np.arange(n) % 5


def test_skewed_oof_gets_the_tail_class_predicted_and_a_nested_gain_without_losing_accuracy() -> None:
    lp, y, folds = skewed()
    assert 2 not in lp.argmax(axis=1)  # the tail class is never predicted
    bias = fit_class_bias(lp, y, folds=folds)
    assert bias.applied and bias.reason.startswith("pays")
    assert bias.before["never_predicted"] == 1 and bias.after["never_predicted"] == 0
    assert bias.after["macro_f1"] > bias.before["macro_f1"] + 0.05
    assert bias.after["accuracy"] >= bias.before["accuracy"]
    assert bias.offsets[2] > max(bias.offsets[0], bias.offsets[1]) + 1  # the tail class is lifted
    np.testing.assert_array_equal(bias.offsets, bias.fitted)
    pred = (lp + bias.offsets).argmax(axis=1)
    after = summary(pred, y, n_classes=3)
    assert (pred == 2).any() and after["macro_f1"] > bias.before["macro_f1"]
    assert after["accuracy"] >= bias.before["accuracy"]  # the fit's constraint on its own rows

    record = json.loads(json.dumps(bias.record()))  # what the manifest holds
    assert record["applied"] and record["nested"]["after"] == bias.after
    np.testing.assert_array_equal(stored_offsets(record, n_classes=3), bias.offsets)


def test_balanced_well_separated_oof_gets_no_bias() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2000)
    logits = rng.normal(size=(2000, 4))
    logits[np.arange(2000), y] += 6.0
    bias = fit_class_bias(log_softmax(logits), y, folds=np.arange(2000) % 5)
    assert not bias.applied and bias.reason.startswith("does not pay")
    assert not bias.offsets.any() and not bias.fitted.any()
    assert bias.record()["offsets"] == [0.0] * 4
    assert stored_offsets(bias.record(), n_classes=4) is None


def test_accuracy_tolerance_and_a_single_fold_decide_whether_offsets_ship() -> None:
    """A calibrated posterior's argmax is accuracy-optimal: more macro-F1 costs accuracy, which a tolerance
    may allow; one fold leaves nothing to check the gain on."""
    lp, y, folds = skewed(under=0.0)
    strict = fit_class_bias(lp, y, folds=folds)
    assert not strict.applied and not strict.offsets.any()
    loose = fit_class_bias(lp, y, folds=folds, max_accuracy_drop=0.05)
    assert loose.applied and loose.after["macro_f1"] > loose.before["macro_f1"]
    assert loose.after["accuracy"] >= loose.before["accuracy"] - 0.05
    single = fit_class_bias(*skewed()[:2], folds=np.zeros(3000, dtype=int))
    assert not single.applied and "single fold" in single.reason and single.fitted[2] > 0
    assert single.after == single.before


def test_offsets_that_pay_nested_but_fit_to_zero_on_all_rows_are_not_shipped(monkeypatch) -> None:
    """The nested check may find a gain the final fit on every row does not reproduce (its accuracy margin
    is tighter on more rows): nothing is then shipped, and the reason says so."""
    from lib import bias as bias_module

    lp, y, folds = skewed()
    fit = bias_module._fit

    def zero_on_all_rows(fr, labels, **options):
        return np.zeros(fr.n_classes) if len(labels) == len(y) else fit(fr, labels, **options)

    monkeypatch.setattr(bias_module, "_fit", zero_on_all_rows)
    result = fit_class_bias(lp, y, folds=folds)
    assert result.after["macro_f1"] > result.before["macro_f1"]  # the nested offsets did pay
    assert not result.applied and "keeps every offset at 0" in result.reason
    assert stored_offsets(result.record(), n_classes=3) is None


def test_topk_and_many_classes_fit_only_the_candidates() -> None:
    """A TopK of the same full width gives the dense fit's offsets; at 2,000 classes stored top-5 only the
    classes some row ranks in its top 5 get an offset, at most max_classes of them, and the fit stays fast."""
    lp, y, _ = skewed(n=1200)
    dense = fit_offsets(lp, y)
    np.testing.assert_array_equal(fit_offsets(TopK.from_logits(lp, 3), y), dense)

    rng = np.random.default_rng(1)
    n, c = 4000, 2000
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)).astype(np.float32)
    logits[np.arange(n), y] += 3.0
    top = TopK.from_logits(logits, 5)
    start = time.perf_counter()
    offsets = fit_class_bias(top, y, folds=np.arange(n) % 4, candidates=5).fitted
    assert time.perf_counter() - start < 60  # 5 fits of at most 3 sweeps; a few seconds here
    assert offsets.shape == (c,) and offsets.any()
    assert set(np.flatnonzero(offsets)) <= set(np.unique(top.index).tolist())
    capped = fit_offsets(top, y, candidates=5, max_classes=20)
    assert 0 < np.count_nonzero(capped) <= 20


def test_bad_arguments_are_refused_by_name() -> None:
    lp, y, folds = skewed(n=100)
    with pytest.raises(ValueError, match="labels"):
        fit_offsets(lp, y[:-1])
    with pytest.raises(ValueError, match="objective"):
        fit_offsets(lp, y, objective="accuracy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        fit_class_bias(lp, y, folds=folds, max_accuracy_drop=2.0)
    with pytest.raises(ValueError, match="folds"):
        fit_class_bias(lp, y, folds=folds[:-1])
    with pytest.raises(ValueError, match="2 classes"):
        stored_offsets({"applied": True, "offsets": [1.0, 0.0, 0.0]}, n_classes=2)


def test_apply_moves_probabilities_as_log_offsets() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    out = apply_class_bias(probs, offsets=np.array([0.0, 0.0, np.log(3.0)]))
    np.testing.assert_allclose(out, [np.array([0.6, 0.3, 0.3]) / 1.2, np.array([0.2, 0.2, 1.8]) / 2.2])
    assert stored_offsets(None, n_classes=3) is None  # a bundle from before the key
    assert stored_offsets({"applied": False, "reason": "class_bias none: not fitted"}, n_classes=3) is None


def test_package_fits_on_the_stackers_nested_oof_unless_switched_off() -> None:
    lp, y, folds = skewed()
    stack = StackResult(table=None, kind="mean", nested=np.exp(lp), final=None)  # type: ignore[arg-type]
    record = package.class_bias(Config(), stack, y, folds, ["head", "middle", "tail"])
    assert record["applied"] and record["offsets"][2] > 1
    assert record["nested"]["after"]["never_predicted"] == 0
    off = package.class_bias(Config(class_bias="none"), stack, y, folds, ["head", "middle", "tail"])
    assert off == {"applied": False, "reason": "class_bias none: not fitted"}


def reseal(src: Path, dst: Path, class_bias: dict | None) -> Path:
    """A copy of the bundle ``src`` whose manifest holds ``class_bias`` (None: no such key), sealed anew."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / bundle.MANIFEST).read_text())
    manifest.pop("class_bias", None)
    if class_bias is not None:
        manifest["class_bias"] = class_bias
    bundle.write_manifest(dst, {k: v for k, v in manifest.items() if k not in ("files", "digest")})
    return dst


def predicted(bundle_dir: Path, images: Path, out: Path) -> tuple[list[str], np.ndarray]:
    """predict.py's labels and probabilities [N, 3] (``CLASSES`` order) for every image of ``images``."""
    assert predict.main([str(images), "--bundle", str(bundle_dir), "--out", str(out), "--probs"]) == 0
    rows = list(csv.DictReader(out.open()))
    return [r["label"] for r in rows], np.array([[float(r[c]) for c in CLASSES] for r in rows])


def test_predict_applies_the_bundles_offsets(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The packaged manifest records the class bias; predict moves labels and probabilities by shipped
    offsets; a bundle without the key (as before it existed) predicts the stacker's own probabilities."""
    images = Path(trained_experiments(tmp_path_factory).train_images)  # 3 colours: varied predictions
    packed = packaged_bundle(tmp_path_factory, "bias")
    record = bundle.verify_bundle(packed)["class_bias"]
    assert {"applied", "reason", "offsets", "nested"} <= set(record) and len(record["offsets"]) == 3
    assert record["nested"]["before"]["accuracy"] == pytest.approx(
        bundle.verify_bundle(packed)["scores"]["stacker"]["accuracy"]
    )  # fitted on the shipped stacker's nested OOF

    labels, probs = predicted(reseal(packed, tmp_path / "plain", None), images, tmp_path / "plain.csv")
    target = min(range(3), key=lambda c: labels.count(CLASSES[c]))  # the class predicted least
    assert labels.count(CLASSES[target]) < len(labels)
    lift = np.zeros(3)
    lift[target] = 20.0
    shipped = {"applied": True, "reason": "test", "offsets": lift.tolist()}
    moved, _ = predicted(reseal(packed, tmp_path / "lift", shipped), images, tmp_path / "lift.csv")
    assert moved == [CLASSES[target]] * len(labels)  # red if predict ignored the offsets

    offsets = np.array([0.7, -0.4, 0.0])
    shipped = {"applied": True, "reason": "test", "offsets": offsets.tolist()}
    labels2, probs2 = predicted(reseal(packed, tmp_path / "small", shipped), images, tmp_path / "small.csv")
    expected = apply_class_bias(probs, offsets=offsets)
    np.testing.assert_allclose(probs2, expected, atol=1e-5)
    assert labels2 == [CLASSES[i] for i in expected.argmax(axis=1)]
