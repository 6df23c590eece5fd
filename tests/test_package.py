"""package.py: the bundle's files, hashes and manifest; OOF per view computed as predict.py computes it; the
greedy time plan under tight, loose and no budgets; the ladder; errors.

Two tiny experiments (timm's test_efficientnet at 32 px, 2 folds of 12 + 12 images, 1 epoch; the second is
the same recipe with another seed) trained once for the module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import CLASSES, base_cfg, eval_tf, fold_data, make_data, write_yaml

import package
import train
from lib import bundle, plan
from lib.config import Config
from lib.images import read_rgb
from lib.layout import read_folds
from lib.models import load_checkpoint, model_from_checkpoint
from lib.oof import aligned, read_oof
from lib.preprocess import Preprocessing
from lib.stacker import Stacker

EXPS = ("t", "t2")


def trained_experiments(factory: pytest.TempPathFactory) -> Config:
    """Tiny data and two trained 2-fold experiments 't' (seed 42) and 't2' (seed 7), trained once per pytest
    session (test_predict.py uses them too); the config packages them with an hflip view."""
    root = factory.getbasetemp() / "tiny_two_experiments"
    settings = {"n_folds": 2, "epochs": 1, "tta_views": ["hflip"], "bundle_dir": str(root / "bundle"),
                "test_images": str(root / "no_test_images")}  # fmt: skip
    if not (root / "DONE").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        cfg = make_data(root, per_class=8, **settings)
        for exp, seed in zip(EXPS, (42, 7), strict=True):
            for fold in (0, 1):
                train.train_fold(dataclasses.replace(cfg, exp=exp, seed=seed), fold)
        (root / "DONE").write_text("")
    return base_cfg(root, **settings)


def packaged_bundle(factory: pytest.TempPathFactory, name: str) -> Path:
    """:func:`trained_experiments` packaged into a fresh bundle folder (the bundle predict tests run)."""
    cfg = trained_experiments(factory)
    out = factory.mktemp(name) / "bundle"
    package.package(dataclasses.replace(cfg, bundle_dir=str(out)))
    return out


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return trained_experiments(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(cfg: Config) -> dict:
    """A bundle with neither a time limit nor ms_per_image: every member and view."""
    return package.package(cfg)


VIEWS = ["hflip", "vflip", "scale1.25"]


@pytest.fixture(scope="module")
def views_cfg(cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Experiment 'v' on the same tiny data, trained with the test-time views :data:`VIEWS` into an output
    folder of its own (the other tests package every experiment of theirs)."""
    root = tmp_path_factory.mktemp("views")
    v = dataclasses.replace(
        cfg, exp="v", output_dir=str(root / "output"), bundle_dir=str(root / "bundle"), tta_views=VIEWS
    )
    for fold in (0, 1):
        train.train_fold(v, fold)
    return v


def test_bundle_holds_slim_members_stacker_and_a_verified_manifest(cfg: Config, manifest: dict) -> None:
    folder = Path(cfg.bundle_dir)
    assert bundle.verify_bundle(folder) == manifest
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == {bundle.MANIFEST, *manifest["files"]}
    assert {f"members/{e}/fold{k}.pt" for e in EXPS for k in (0, 1)} <= files
    for rel in manifest["files"]:
        assert manifest["files"][rel] == bundle.file_sha256(folder / rel)
    ckpt = torch.load(folder / "members/t/fold0.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "classes", "config", "data_config"}  # weights only: no optimizer, EMA, RNG
    src = load_checkpoint(Path(cfg.output_dir) / "t/fold0/best.pt")
    for k, v in src["model"].items():
        assert torch.equal(ckpt["model"][k], v), k
    model_from_checkpoint(folder / "members/t2/fold1.pt")  # rebuilds offline (pretrained none)

    assert manifest["format_version"] == bundle.FORMAT_VERSION and manifest["classes"] == CLASSES
    assert manifest["fallback"]["label"] in CLASSES
    assert manifest["plan"]["budget"]["kind"] == "none"
    assert manifest["plan"]["chosen"] == {e: ["orig", "hflip"] for e in EXPS}  # no limit: everything
    member = manifest["members"][0]
    pre = member["preprocessing"]
    assert (pre["img_size"], pre["crop"], pre["resize"], pre["interpolation"], pre["in_chans"]) == (
        32,
        "rrc",
        40,
        "bicubic",
        3,
    )
    assert len(pre["mean"]) == len(pre["std"]) == 3 and pre["channels_last"] is True
    assert member["views"] == ["orig", "hflip"] and member["model_ms_per_image"]["32"] > 0
    assert {(c["member"], c["view"]) for c in manifest["candidates"]} == {
        (e, v) for e in EXPS for v in ("orig", "hflip")
    }
    assert all(c["model_ms_per_image"] > 0 and 0 <= c["oof"]["accuracy"] <= 1 for c in manifest["candidates"])
    assert [s["name"] for s in manifest["ladder"]] == ["full", "orig", "fastest", "one_fold", "fallback"]
    costs = [s["ms_per_image"] for s in manifest["ladder"]]
    assert costs == sorted(costs, reverse=True) and costs[-1] == 0
    assert manifest["ladder"][3]["members"][0]["folds"] == [0]
    assert set(manifest["scores"]["members"]) == set(EXPS) and manifest["scores"]["stacker"]["log_loss"] > 0
    assert manifest["config"]["exp"] == cfg.exp and manifest["plan"]["machine"]["torch_threads"] >= 1

    # The stacker was fitted on exactly the chosen members' features.
    stacker = Stacker.load(folder / "stacker")
    assert stacker.kind == manifest["stacker"]["kind"] and stacker.n_members == 2 and stacker.n_classes == 3
    assert manifest["stacker"]["members"] == list(EXPS)


def test_oof_per_view_is_what_prediction_computes(cfg: Config, manifest: dict) -> None:
    """'orig' through lib.preprocess reproduces training's validation logits (same preprocessing as predict.py);
    oof_hflip.npz (training's) is each fold model on its own validation images, mirrored."""
    folds = read_folds(Path(cfg.folds_csv))
    member = package.load_member(cfg, "t", [0, 1])
    computed, failed = package.compute_view_oofs(cfg, member, ["orig"], folds, torch.device("cpu"))
    orig = computed["orig"]
    assert failed == {}
    # Both rounded to float16 by the prediction store (lib/oof.py): equal within one float16 step.
    np.testing.assert_allclose(
        orig, aligned(Path(cfg.output_dir) / "t/oof.npz", folds)[0], rtol=1e-3, atol=1e-3
    )

    cached = read_oof(Path(cfg.output_dir) / "t/oof_hflip.npz")
    assert (
        cached["image"].tolist() == folds["image"].tolist()
        and cached["fold"].tolist() == folds["fold"].tolist()
    )
    row = folds.iloc[0]
    model, ckpt = model_from_checkpoint(Path(cfg.output_dir) / f"t/fold{row['fold']}/best.pt")
    path = fold_data(cfg, int(row["fold"])).val.set_index("image").loc[row["image"], "path"]
    x = eval_tf(cfg, ckpt["data_config"], 32)(image=read_rgb(Path(path)))["image"][None]
    with torch.no_grad():
        expected = model(torch.flip(x, [3])).numpy()[0]
    np.testing.assert_allclose(cached["logits"][0], expected, rtol=1e-3, atol=1e-3)  # stored float16


def test_training_writes_the_view_oof_package_would_compute(views_cfg: Config) -> None:
    """The oof_<view>.npz training wrote are what package.py's own pass over the same checkpoints gives."""
    folds = read_folds(Path(views_cfg.folds_csv))
    member = package.load_member(views_cfg, "v", [0, 1])
    computed, failed = package.compute_view_oofs(views_cfg, member, VIEWS, folds, torch.device("cpu"))
    assert failed == {}
    for view in VIEWS:
        written = aligned(Path(views_cfg.output_dir) / f"v/oof_{view}.npz", folds)[0]
        np.testing.assert_allclose(written, computed[view], rtol=1e-3, atol=1e-3, err_msg=view)  # float16


def test_package_after_training_runs_no_model_over_the_training_images(
    views_cfg: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every view's OOF comes from training's files: package.py's own pass (compute_view_oofs) never runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("package.py ran the folds over the training images: training wrote no view OOF")

    monkeypatch.setattr(package, "compute_view_oofs", refuse)
    with caplog.at_level(logging.INFO):
        manifest = package.package(views_cfg)
    assert manifest["plan"]["chosen"] == {"v": ["orig", *VIEWS]}
    assert f"read from its experiment: orig, {', '.join(VIEWS)}; computed here: none" in caplog.text


def test_view_caches_are_reused_and_a_rerun_replaces_the_bundle(cfg: Config, manifest: dict) -> None:
    cache = Path(cfg.output_dir) / "t/oof_hflip.npz"
    before = cache.stat().st_mtime_ns
    again = package.package(dataclasses.replace(cfg, tta_views=["hflip"], stacker="mean"))
    assert cache.stat().st_mtime_ns == before  # newer than the checkpoints: not recomputed
    assert again["stacker"]["kind"] == "mean"
    assert bundle.verify_bundle(Path(cfg.bundle_dir))["stacker"]["kind"] == "mean"
    leftovers = [p.name for p in Path(cfg.bundle_dir).parent.iterdir() if p.name.startswith(".bundle")]
    assert leftovers == []


def test_tight_ms_per_image_through_the_cli_keeps_the_best_single_member(
    cfg: Config, manifest: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "tight"
    yml = write_yaml(dataclasses.replace(cfg, bundle_dir=str(out), ms_per_image=0.001), tmp_path / "c.yaml")
    with caplog.at_level(logging.WARNING):
        assert package.main(["--config", str(yml)]) == 0
    m = bundle.verify_bundle(out)
    best = min(EXPS, key=lambda e: m["scores"]["members"].get(e, {"log_loss": np.inf})["log_loss"])
    assert m["plan"]["chosen"] == {best: ["orig"]}
    assert m["plan"]["steps"][0]["fits"] is False
    assert "does not fit the budget" in caplog.text
    assert sorted(p.relative_to(out).as_posix() for p in (out / "members").rglob("*.pt")) == [
        f"members/{best}/fold0.pt", f"members/{best}/fold1.pt"
    ]  # fmt: skip
    assert [s["name"] for s in m["ladder"]] == ["full", "one_fold", "fallback"]  # no cheaper distinct steps
    assert m["stacker"]["members"] == [best] and Stacker.load(out / "stacker").n_members == 1


# ---------------------------------------------------------------------------------------------------------
# The plan on synthetic OOF logits and costs (deterministic).


def synthetic(n: int = 90, seed: int = 0) -> tuple[dict[str, plan.Member], np.ndarray, np.ndarray]:
    """Member 'a' is good, 'b' fair and complementary, 'c' noise; each view adds independent noise, so
    averaging views helps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    onehot = np.eye(3)[y]
    pre = Preprocessing.from_dict({
        "img_size": 32, "crop": "rrc", "resize": 40, "upscale": False, "letterbox": False, "mean": [0.5] * 3,
        "std": [0.5] * 3, "interpolation": "bicubic", "in_chans": 3, "channels_last": True,
    })  # fmt: skip
    members = {}
    for name, signal, ms in (("a", 2.0, 10.0), ("b", 1.2, 4.0), ("c", 0.0, 1.0)):
        oof = {v: signal * onehot + rng.normal(0, 1.5, (n, 3)) for v in ("orig", "hflip")}
        members[name] = plan.Member(name, [0, 1], [], list("xyz"), {}, pre, oof, {32: ms}, load_s=2.0)
    return members, y, np.arange(n) % 2


def costs_of(members: dict[str, plan.Member]) -> plan.Costs:
    return plan.Costs(members, 1.0, {members["a"].pre: 0.5})


def choose(members: dict[str, plan.Member], costs: plan.Costs, budget: plan.Budget, y: np.ndarray,
           folds: np.ndarray) -> tuple[plan.Selection, list[dict]]:  # fmt: skip
    """plan.choose_plan over views orig + hflip with the default config's stacker settings."""
    template = Stacker(**Config().stacker_options())
    return plan.choose_plan(members, ["orig", "hflip"], costs, budget, y, folds, template=template)


def test_plan_tight_budget_keeps_fewer_members_and_views() -> None:
    members, y, folds = synthetic()
    costs = costs_of(members)
    everything, _ = choose(members, costs, plan.Budget("none"), y, folds)
    assert everything == {n: ["orig", "hflip"] for n in "abc"}

    single = costs.per_image({"a": ["orig"]})
    assert single == pytest.approx(1.0 + 0.5 + 10.0)
    tight, steps = choose(members, costs, plan.Budget("ms_per_image", ms_per_image=single + 1), y, folds)
    assert tight == {"a": ["orig"]} and len(steps) == 1

    loose, steps = choose(members, costs, plan.Budget("ms_per_image", ms_per_image=1000.0), y, folds)
    assert set(loose) >= {"a", "b"} and loose["a"] == ["orig", "hflip"]
    assert "c" not in loose  # noise costs time and loses log-loss: not worth it however loose the budget
    losses = [s["log_loss"] for s in steps]
    assert losses == sorted(losses, reverse=True) and all(s["gain"] > 0 for s in steps[1:])
    assert costs.per_image(loose) <= 1000.0

    middle, _ = choose(
        members, costs,
        plan.Budget("ms_per_image", ms_per_image=costs.per_image({"a": ["orig"], "b": ["orig"]}) + 0.1),
        y, folds,
    )  # fmt: skip
    assert costs.per_image(middle) <= costs.per_image({"a": ["orig"], "b": ["orig"]}) + 0.1
    assert len(middle) + sum(len(v) for v in middle.values()) < len(loose) + sum(
        len(v) for v in loose.values()
    )


def test_time_limit_budget_counts_startup_loading_and_the_margin(tmp_path: Path) -> None:
    members, y, folds = synthetic()
    costs = costs_of(members)
    per = costs.per_image({"a": ["orig"], "b": ["orig"]})
    # 100 images: start-up 5 s + loading 2 s per member + per-image costs, inside 60 s less the 1.8 s margin.
    budget = plan.Budget(
        "time_limit", time_limit=60.0, images=100, startup_s=5.0, margin_s=bundle.safety_margin(60.0)
    )
    assert budget.seconds(costs, {"a": ["orig"], "b": ["orig"]}) == pytest.approx(
        5.0 + 4.0 + 100 * per / 1000
    )
    sel, _ = choose(members, costs, budget, y, folds)
    assert budget.fits(costs, sel) and budget.seconds(costs, sel) <= 60.0 - budget.margin_s
    short = plan.Budget(
        "time_limit", time_limit=9.0, images=100, startup_s=5.0, margin_s=bundle.safety_margin(9.0)
    )
    assert choose(members, costs, short, y, folds)[0] == {"a": ["orig"]}

    with pytest.raises(package.PackageError, match="plan_images"):
        package.make_budget(Config(time_limit=60.0, test_images=str(tmp_path / "none")), measure=False)
    b = package.make_budget(Config(time_limit=60.0, plan_images=500), measure=False)
    assert (b.kind, b.images, b.margin_s) == ("time_limit", 500, bundle.safety_margin(60.0))


def test_ladder_steps_get_cheaper_and_name_the_fastest_member() -> None:
    members, _, _ = synthetic()
    ladder = plan.make_ladder({"a": ["orig", "hflip"], "b": ["orig"]}, members, costs_of(members))
    assert [s["name"] for s in ladder] == ["full", "orig", "fastest", "one_fold", "fallback"]
    assert ladder[2]["members"] == [{"name": "b", "views": ["orig"], "folds": [0, 1]}]  # b: 4 ms < a: 10 ms
    assert ladder[3]["members"] == [{"name": "b", "views": ["orig"], "folds": [0]}]
    assert ladder[3]["ms_per_image"] == pytest.approx(1.0 + 0.5 + 2.0)
    assert [s["stacker"] for s in ladder] == [True, True, False, False, False]


def test_missing_fold_checkpoint_is_refused_by_name(
    cfg: Config, manifest: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "output"
    for exp in EXPS:
        for src in (Path(cfg.output_dir) / exp).rglob("*"):
            if src.is_file() and src.name != "last.pt":
                dst = broken / exp / src.relative_to(Path(cfg.output_dir) / exp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
    (broken / "t2/fold1/best.pt").unlink()
    yml = write_yaml(
        dataclasses.replace(cfg, output_dir=str(broken), bundle_dir=str(tmp_path / "b")), tmp_path / "c.yaml"
    )
    with caplog.at_level(logging.ERROR):
        assert package.main(["--config", str(yml)]) == 2
    assert "t2/fold1/best.pt" in caplog.text
    assert not (tmp_path / "b").exists()
    # Candidates: package_members, then the stack's members, then every experiment with an oof.npz.
    c = dataclasses.replace(cfg, output_dir=str(broken))
    assert package.candidate_names(c) == list(EXPS)
    (broken / "stack").mkdir()
    (broken / "stack" / "stack.json").write_text(json.dumps({"members": ["t2"]}))
    assert package.candidate_names(c) == ["t2"]
    assert package.candidate_names(dataclasses.replace(c, package_members=["t"])) == ["t"]
