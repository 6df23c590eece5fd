"""Long-tail options: square-root and class-balanced sampling (train.py ``sampler``, finetune.py
``ft_sampler``), the logit-adjusted training loss (``logit_adjust_tau``, Menon et al. 2021) and post-hoc logit
adjustment (lib/metrics.adjust_logits).

Skewed data: tiny's coloured images with most of two classes dropped from folds.csv, or synthetic Gaussian
features and logits (3 classes in 2-D, equal variance, long-tailed training counts, a balanced validation
set).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from tiny import CLASSES, fold_data, make_data
from torch.utils.data import DistributedSampler

import finetune
import train
from lib.config import Config
from lib.data import SAMPLER_POWERS, class_prior, class_sampler
from lib.metrics import adjust_logits

COUNTS = np.array([800, 150, 50])  # a long tail: 16:3:1
MEANS = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])  # overlapping classes: the prior moves the boundaries


def expected_shares(counts: np.ndarray, power: float) -> np.ndarray:
    weights = counts.astype(np.float64) ** power
    return weights / weights.sum()


def gaussians(counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features float32 [N, 2] around MEANS (unit variance), ``counts[c]`` of class c; labels int64 [N]."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(MEANS[c], 1.0, size=(n, 2)) for c, n in enumerate(counts)])
    return torch.tensor(x, dtype=torch.float32), torch.from_numpy(np.repeat(np.arange(len(counts)), counts))


def recalls(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each class's recall; their mean is the balanced accuracy."""
    return np.array([(pred[y == c] == c).mean() for c in range(len(MEANS))])


# -- sampling ---------------------------------------------------------------------------------------------


def test_sqrt_sampling_draws_class_shares_between_natural_and_balanced() -> None:
    labels = np.repeat(np.arange(3), COUNTS)
    assert SAMPLER_POWERS == {"natural": 1.0, "sqrt": 0.5, "balanced": 0.0}
    shares = {}
    for name, power in SAMPLER_POWERS.items():
        sampler = class_sampler(
            labels, power=power, num_samples=40_000, generator=torch.Generator().manual_seed(0)
        )
        drawn = np.bincount(labels[list(sampler)], minlength=3) / len(sampler)
        expected = expected_shares(COUNTS, power)  # sqrt: 0.594, 0.257, 0.149
        np.testing.assert_allclose(drawn, expected, atol=0.01)  # ~4 standard errors of 40k draws
        np.testing.assert_allclose(class_prior(labels, num_classes=3, power=power), expected)
        shares[name] = drawn
    for c in (1, 2):  # the tail classes gain, the head class loses, sqrt in between
        assert shares["natural"][c] < shares["sqrt"][c] - 0.05 < shares["balanced"][c] - 0.1
    assert shares["natural"][0] > shares["sqrt"][0] + 0.1 > shares["balanced"][0] + 0.2


def test_class_prior_keeps_absent_classes_finite_and_refuses_foreign_indices() -> None:
    np.testing.assert_allclose(class_prior(np.array([0, 0, 0, 1]), num_classes=3), [0.6, 0.2, 0.2])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        class_prior(np.array([0, 3]), num_classes=3)
    with pytest.raises(ValueError, match="at least one label"):
        class_sampler(np.array([], dtype=np.int64), power=0.5)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """tiny's 3 classes over 2 folds, thinned in folds.csv to 6 : 3 : 1 images per fold."""
    root = tmp_path_factory.mktemp("longtail")
    cfg = make_data(root, per_class=12, n_folds=2, epochs=1, ema=False)
    folds = pd.read_csv(cfg.folds_csv, dtype=str)
    rank = folds.groupby(["label", "fold"]).cumcount()
    keep = folds["label"].map({CLASSES[0]: 6, CLASSES[1]: 3, CLASSES[2]: 1})
    folds[rank < keep].to_csv(cfg.folds_csv, index=False)
    return cfg


def train_counts(cfg: Config, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """A fold's training targets (int [N]) and their class counts [3]."""
    targets = fold_data(cfg, fold).train["target"].to_numpy()
    return targets, np.bincount(targets, minlength=3)


def test_train_draws_with_the_configured_sampler_and_refuses_it_under_ddp(
    skewed: Config, tmp_path: Path
) -> None:
    data = fold_data(skewed, 0)
    targets, counts = train_counts(skewed, 0)
    assert counts.tolist() == [6, 3, 1]
    for name in ("sqrt", "balanced"):
        trainer = train.Trainer(
            dataclasses.replace(skewed, sampler=name), 0, data, tmp_path, 0, 1, torch.device("cpu")
        )
        weights = trainer.sampler.weights.numpy()
        np.testing.assert_allclose(weights, counts[targets] ** (SAMPLER_POWERS[name] - 1.0))
    trainer = train.Trainer(skewed, 0, data, tmp_path, 0, 1, torch.device("cpu"))
    assert isinstance(trainer.sampler, DistributedSampler)  # natural: a plain shuffle, each image once
    with pytest.raises(train.TrainError, match="sampler sqrt is not supported with DDP"):
        train.Trainer(
            dataclasses.replace(skewed, sampler="sqrt"), 0, data, tmp_path, 0, 2, torch.device("cpu")
        )


def test_finetune_draws_the_heads_images_with_the_configured_sampler(skewed: Config) -> None:
    train.train_fold(skewed, 0)
    source = finetune.source_checkpoint(skewed, 0)
    targets, counts = train_counts(skewed, 0)
    for name in ("sqrt", "balanced"):
        run = finetune.FoldRun(dataclasses.replace(skewed, ft_sampler=name), 0, source)
        np.testing.assert_allclose(
            run.sampler.weights.numpy(), counts[targets] ** (SAMPLER_POWERS[name] - 1.0)
        )
    assert finetune.FoldRun(dataclasses.replace(skewed, ft_sampler="natural"), 0, source).sampler is None


# -- the logit-adjusted loss --------------------------------------------------------------------------------


def test_the_adjusted_loss_is_the_plain_loss_on_logits_plus_tau_log_prior() -> None:
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    soft = torch.softmax(torch.randn(16, 3, generator=g), 1)
    prior = expected_shares(COUNTS, 1.0)
    shift = 0.7 * torch.log(torch.tensor(prior, dtype=torch.float32))
    hard = train.training_loss(soft=False, label_smoothing=0.1, prior=prior, tau=0.7)
    torch.testing.assert_close(hard(z, y), F.cross_entropy(z + shift, y, label_smoothing=0.1))
    mixed = train.training_loss(soft=True, label_smoothing=0.1, prior=prior, tau=0.7)
    torch.testing.assert_close(mixed(z, soft), SoftTargetCrossEntropy()(z + shift, soft))
    plain = train.training_loss(soft=False, label_smoothing=0.1, prior=prior, tau=0.0)
    torch.testing.assert_close(plain(z, y), F.cross_entropy(z, y, label_smoothing=0.1))
    assert not torch.allclose(plain(z, y), hard(z, y))


@pytest.mark.parametrize("cutmix", [0.0, 1.0], ids=["hard", "cutmix"])
def test_train_adjusts_its_loss_by_the_prior_its_sampler_draws(
    skewed: Config, tmp_path: Path, cutmix: float
) -> None:
    """The fold's class counts ^ the sampler's power make the prior; CutMix's soft rows get it too."""
    data = fold_data(skewed, 0)
    _, counts = train_counts(skewed, 0)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 3, generator=g)
    y = torch.softmax(torch.randn(8, 3, generator=g), 1) if cutmix else torch.randint(0, 3, (8,), generator=g)
    cfg = dataclasses.replace(skewed, logit_adjust_tau=0.7, cutmix_alpha=cutmix, mix_prob=1.0)
    for name in ("natural", "sqrt"):
        trainer = train.Trainer(
            dataclasses.replace(cfg, sampler=name), 0, data, tmp_path, 0, 1, torch.device("cpu")
        )
        prior = torch.tensor(expected_shares(counts, SAMPLER_POWERS[name]), dtype=torch.float32)
        shifted = z + 0.7 * torch.log(prior)
        expected = (
            SoftTargetCrossEntropy()(shifted, y)
            if cutmix
            else F.cross_entropy(shifted, y, label_smoothing=0.1)
        )
        torch.testing.assert_close(trainer.criterion(z, y), expected)


@pytest.mark.parametrize("soft", [False, True], ids=["cross_entropy", "soft_target"])
def test_logit_adjustment_lifts_the_tail_of_a_trained_linear_head(soft: bool) -> None:
    """A linear head trained with train.py's loss on 2000 : 200 : 40 Gaussians: with tau 1 its biases favour
    the tail and a balanced validation set's balanced accuracy and tail recall rise (Menon et al. 2021)."""
    x, y = gaussians([2000, 200, 40], seed=0)
    x_val, y_val = gaussians([2000, 2000, 2000], seed=1)
    prior = class_prior(y.numpy(), num_classes=3)
    target = F.one_hot(y, 3).float() if soft else y
    results = {}
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        head = torch.nn.Linear(2, 3)
        loss_fn = train.training_loss(soft=soft, label_smoothing=0.0, prior=prior, tau=tau)
        optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(300):  # full batch: converged (the biases settle)
            optimizer.zero_grad()
            loss_fn(head(x), target).backward()
            optimizer.step()
        with torch.no_grad():
            bias, pred = head.bias.numpy().copy(), head(x_val).argmax(1).numpy()
        results[tau] = bias, recalls(pred, y_val.numpy())
    (bias0, recall0), (bias1, recall1) = results[0.0], results[1.0]
    assert (bias1[2] - bias1[0]) > (bias0[2] - bias0[0]) + 1.5  # tail vs head class: log(50) = 3.9 in theory
    assert recall1[2] > recall0[2] + 0.4 and recall1.mean() > recall0.mean() + 0.15


# -- post hoc -----------------------------------------------------------------------------------------------


def test_posthoc_adjustment_raises_tail_recall_of_long_tailed_logits() -> None:
    """Bayes logits under a 0.9 : 0.08 : 0.02 prior pick the head class; subtracting log(prior) recovers
    the balanced optimum (the class-conditional likelihoods)."""
    prior = np.array([0.9, 0.08, 0.02])
    x, y = gaussians([3000, 3000, 3000], seed=2)
    log_likelihood = -0.5 * ((x.numpy()[:, None, :] - MEANS[None]) ** 2).sum(-1)
    logits = log_likelihood + np.log(prior)
    adjusted = adjust_logits(logits, prior=prior, tau=1.0)
    np.testing.assert_allclose(adjusted, log_likelihood)
    before, after = recalls(logits.argmax(1), y.numpy()), recalls(adjusted.argmax(1), y.numpy())
    assert after[2] > before[2] + 0.4 and after.mean() > before.mean() + 0.1
    np.testing.assert_allclose(adjust_logits(logits, prior=prior, tau=0.0), logits)
    with pytest.raises(ValueError, match="does not fit"):
        adjust_logits(logits, prior=prior[:2])
    with pytest.raises(ValueError, match="> 0"):
        adjust_logits(logits, prior=np.array([1.0, 0.0, 0.0]))
