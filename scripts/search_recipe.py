"""A recipe search on one fold's validation split: accuracy against wall time, per trial.

    python scripts/search_recipe.py --config configs/demo.yaml --trials configs/search/demo.yaml [--fold 0]

``--trials`` is a YAML list of ``{name: ..., <config key>: <value>, ...}``: each trial is the base config
with those keys changed. Each runs ``src/train.py --fold K --resume`` as experiment ``<exp>_search_<name>``
(so a killed search resumes where it stopped, and a finished trial is read back, not retrained), and its
row goes to ``<output_dir>/search/<exp>_fold<K>.csv``: the trial's keys, the best epoch's validation
accuracy, macro-F1 and log-loss, the epochs run, images per second and the training seconds (log.csv's
per-epoch seconds, validation included). Only the training folds choose anything here: the held-out test
labels are never read. The table printed last is sorted by accuracy, with each trial's minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lib.config import ConfigError, load_config, overrides_from_yaml, save_config  # noqa: E402
from lib.layout import Experiment  # noqa: E402

COLUMNS = ["trial", "accuracy", "macro_f1", "val_loss", "best_epoch", "epochs", "images_per_s", "seconds"]


def read_trials(path: Path) -> list[dict[str, Any]]:
    """The trial list: each a mapping with a unique ``name`` and config keys. Raises ConfigError."""
    trials = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(trials, list) or not all(isinstance(t, dict) and "name" in t for t in trials):
        raise ConfigError(f"{path}: expected a YAML list of mappings, each with a 'name' and config keys")
    names = [str(t["name"]) for t in trials]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: trial names repeat: {names}")
    return trials


def trial_config(base: Path, trial: dict[str, Any], exp: str, folder: Path) -> Path:
    """Write the trial's resolved config (base YAML + the trial's keys + its experiment name)."""
    values = {**overrides_from_yaml(base), **{k: v for k, v in trial.items() if k != "name"}, "exp": exp}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{trial['name']}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    cfg = load_config(path)  # type-checks the trial's keys before any training starts
    save_config(cfg, path)
    return path


def trial_row(log_csv: Path, name: str, metric: str) -> dict[str, Any]:
    """The trial's best epoch by ``metric`` (as train.py chose best.pt) and its totals."""
    log = pd.read_csv(log_csv)
    best = log["val_loss"].idxmin() if metric == "loss" else log[metric].idxmax()
    return {
        "trial": name,
        "accuracy": log.at[best, "accuracy"],
        "macro_f1": log.at[best, "macro_f1"],
        "val_loss": log.at[best, "val_loss"],
        "best_epoch": int(log.at[best, "epoch"]),
        "epochs": len(log),
        "images_per_s": log["images_per_s"].mean(),
        "seconds": log["seconds"].sum(),
    }


def run_trial(config: Path, fold: int) -> None:
    train = str(ROOT / "src" / "train.py")
    cmd = [sys.executable, train, "--config", str(config), "--fold", str(fold), "--resume"]
    print("==", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the base config, e.g. configs/demo.yaml")
    parser.add_argument("--trials", type=Path, required=True, help="YAML list of trials (name + config keys)")
    parser.add_argument("--fold", type=int, default=0, help="the fold whose split scores the trials")
    args = parser.parse_args(argv)
    try:
        base = load_config(args.config)
        trials = read_trials(args.trials)
    except ConfigError as e:
        print(f"search_recipe: {e}", file=sys.stderr)
        return 2
    out = Path(base.output_dir) / "search"
    table = out / f"{base.exp}_fold{args.fold}.csv"
    rows = []
    for trial in trials:
        exp = f"{base.exp}_search_{trial['name']}"
        config = trial_config(args.config, trial, exp, out / "configs")
        log_csv = Experiment(Path(base.output_dir) / exp).fold(args.fold) / "log.csv"
        run_trial(config, args.fold)
        row = trial_row(log_csv, str(trial["name"]), load_config(config).val_metric)
        rows.append({**row, **{k: v for k, v in trial.items() if k != "name"}})
        pd.DataFrame(rows).to_csv(table, index=False)
    frame = pd.DataFrame(rows).sort_values("accuracy", ascending=False)
    frame["minutes"] = frame["seconds"] / 60
    print(frame.drop(columns=["seconds"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"== {len(rows)} trials -> {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
