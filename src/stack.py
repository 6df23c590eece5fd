"""Stacking report: compare ways of combining several experiments' out-of-fold logits, nested on their folds.

``python src/stack.py --config configs/X.yaml`` stacks the experiments ``stack_members`` (default: every
``<output_dir>/*/oof.npz`` except stack outputs, which carry a ``stack.json``). Every member must come from the
same ``folds.csv`` (same images, fold ids and classes); a member that does not is refused by name, since its
"out-of-fold" logits could come from a model trained on the very images the stacker is scored on.

The combiners (single, mean, blend, multi-class XGBoost, the XGBoost candidate re-ranker; see lib/stacker.py)
are each scored **nested**: fold k's rows are predicted by a combiner fitted on the other folds only.
``stacker auto`` keeps the lowest nested log-loss. Above ``stack_max_classes`` classes multi-class XGBoost is
not fitted (its cost grows as members x classes^2 per round) and ``stacker xgboost`` is an error; the
re-ranker (XGBoost over each image's candidate classes, the union of every member's top ``stack_candidates``)
runs at any class count. Members are read as stored (lib/oof.py: dense, or top-k for large files), so at
thousands of classes nothing here makes an images x classes array.

Writes ``<output_dir>/<stack_exp>/``: ``oof.npz`` (the chosen combiner's nested OOF log-probabilities in
``logits``, in the store's format, scored by report.py like any experiment), ``stack_report.csv`` and
``stack_report.md`` (the members' and the combiners' OOF scores, which kinds ran and why, the choice),
``stack.json`` (members, features, chosen kind,
classes: package.py takes its members as candidates) and ``config.yaml``. The stacker that ships is fitted
by package.py, with the same code, on the members and views its time plan keeps. The folder is built beside
the old one and swapped in whole, so it never mixes two runs.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd

from lib.common import PipelineError, atomic_dir, atomic_path, atomic_write, get_logger
from lib.config import Config, parse_config, save_config
from lib.layout import OOF, STACK_MARKER, class_names, experiment, find_experiments, read_folds, targets
from lib.oof import OOFError, Predictions, TopK, aligned_predictions, prediction_scores, write_oof
from lib.stacker import Stacker, StackError, candidate_coverage, fit_stacker, log_probs

log = get_logger("stack")


def find_members(cfg: Config) -> list[str]:
    """cfg.stack_members, else every experiment with an oof.npz except stack outputs, sorted by name."""
    if cfg.stack_members:
        names = list(dict.fromkeys(cfg.stack_members))
        if cfg.stack_exp in names:
            raise StackError(
                f"stack_exp {cfg.stack_exp!r} is also a member: its output would replace its input"
            )
        return names
    names = find_experiments(cfg.output_dir, exclude=(cfg.stack_exp,))
    if not names:
        raise StackError(
            f"no experiment with an oof.npz under {cfg.output_dir}/ to stack: train every fold first (python "
            "src/train.py --config <your config> --fold all) and/or fine-tune it (python src/finetune.py --config ...)"
        )
    return names


def read_members(
    names: list[str], *, output_dir: str, folds: pd.DataFrame, classes: list[str]
) -> list[Predictions]:
    """Each member's OOF logits aligned with ``folds``, as stored (float32 [N, C], or a lib.oof.TopK for a
    top-k file); a member whose images, fold ids or classes differ from folds.csv is refused by name
    (StackError)."""
    if not names:
        raise StackError("no members to stack: set stack_members or train an experiment first")
    members = []
    for name in names:
        path = experiment(output_dir, name).oof
        if not path.is_file():
            raise StackError(
                f"member {name!r} has no {path}: train every fold of it (python src/train.py --config <its config> "
                "--fold all) or finish its fine-tune (python src/finetune.py --config <its config>)"
            )
        try:
            members.append(aligned_predictions(path, folds, classes))
        except OOFError as e:
            raise StackError(f"member {name!r} does not share folds.csv with the others: {e}") from None
    return members


def kinds_ran(cfg: Config, n_classes: int, coverage: tuple[float, float]) -> str:
    """Which XGBoost forms the comparison holds and why; ``coverage``: (share of images whose truth is a
    re-ranker candidate, mean candidates per image)."""
    rerank = (
        f"the re-ranker (rerank: XGBoost {cfg.stack_rerank_objective} over each image's candidates, the union "
        f"of every member's top {cfg.stack_candidates} classes: {coverage[1]:.1f} per image on average, the "
        f"truth among them for {coverage[0]:.2%} of the images, its accuracy ceiling)"
    )
    if n_classes > cfg.stack_max_classes:
        return (
            f"No multi-class XGBoost row: {n_classes} classes > stack_max_classes ({cfg.stack_max_classes}); its "
            f"cost grows as members x classes^2 per round. Ran instead: {rerank}; single, mean and blend as always."
        )
    return f"Both XGBoost forms ran: multi-class over all {n_classes} classes, and {rerank}."


def markdown(
    cfg: Config, table: pd.DataFrame, member_rows: pd.DataFrame, chosen: str, final: Stacker, n_classes: int,
    coverage: tuple[float, float],
) -> str:  # fmt: skip
    """stack_report.md: the members, the nested rows with the choice marked, which kinds ran and why, how the
    choice was made."""

    def rows(df: pd.DataFrame, mark: str | None) -> list[str]:
        out = []
        for r in df.itertuples(index=False):
            star = " **(chosen)**" if mark is not None and r.method.split(' ', 1)[0] == mark else ""
            out.append(f"| {r.method}{star} | {r.accuracy:.4f} | {r.macro_f1:.4f} | {r.log_loss:.4f} |")
        return out

    head = ["| method | accuracy | macro_f1 | log_loss |", "| --- | ---: | ---: | ---: |"]
    how = (
        "the lowest nested log-loss, stacker auto"
        if cfg.stacker == "auto"
        else f"set by stacker {cfg.stacker} in the config"
    )
    lines = [
        f"# Stack `{cfg.stack_exp}`", "",
        f"{len(member_rows)} member(s), features {cfg.stack_features}, {n_classes} classes, folds from "
        f"`{cfg.folds_csv}`.", "", "## Members (their own OOF)", "", *head, *rows(member_rows, None), "",
        "## Combiners (nested: fold k predicted by a combiner fitted without fold k)", "", *head,
        *rows(table, chosen), "", kinds_ran(cfg, n_classes, coverage), "", f"Chosen: **{chosen}**, {how}.",
    ]  # fmt: skip
    if chosen == "blend":
        lines.append(
            f"Blend weights {[round(w, 4) for w in final.weights]}, temperature {final.temperature:.4f}."
        )
    if chosen == "xgboost":
        lines.append(
            f"Final XGBoost refitted on all OOF with {final.rounds} rounds (median of the nested fits)."
        )
    if chosen == "rerank":
        lines.append(
            f"Final re-ranker refitted on all OOF with {final.rounds} rounds and temperature "
            f"{final.temperature:.4f} (medians of the nested fits)."
        )
    return "\n".join(lines) + "\n"


def oof_options(cfg: Config, nested: Predictions) -> dict[str, int]:
    """The store's options for the nested OOF: a top-k one keeps its whole candidate frame (cut to
    store_topk, candidates would join the evenly spread rest and report.py would score other numbers than
    the table's)."""
    options = cfg.store_options()
    if isinstance(nested, TopK):
        options["topk"] = max(options["topk"], nested.k)
    return options


def run(cfg: Config) -> str:
    """Stack the members, write ``<output_dir>/<stack_exp>/`` and return the report's markdown."""
    target = experiment(cfg.output_dir, cfg.stack_exp).root
    if target.is_dir() and any(target.iterdir()) and not (target / STACK_MARKER).is_file():
        raise StackError(
            f"{target} exists and is not a stack output (no {STACK_MARKER}): set another stack_exp rather than replace it"
        )
    names = find_members(cfg)
    table_rows = read_folds(cfg.folds_csv)
    classes = class_names(table_rows)
    members = read_members(names, output_dir=cfg.output_dir, folds=table_rows, classes=classes)
    y, folds = targets(table_rows, classes), table_rows["fold"].to_numpy(dtype=np.int64)
    log.info("stacking %d member(s) over %d images x %d classes: %s", len(names), len(y), len(classes), names)
    result = fit_stacker(
        members, y, folds, classes, names, template=Stacker(**cfg.stacker_options()), choice=cfg.stacker
    )
    member_rows = pd.DataFrame(
        [{"method": n, **prediction_scores(m, y, len(classes))} for n, m in zip(names, members, strict=True)]
    )
    coverage = candidate_coverage(members, y, candidates=cfg.stack_candidates)
    text = markdown(cfg, result.table, member_rows, result.kind, result.final, len(classes), coverage)
    chosen = [m.split(" ", 1)[0] == result.kind for m in result.table["method"]]
    report = pd.concat(
        [member_rows.assign(role="member", chosen=False), result.table.assign(role="stacker", chosen=chosen)],
        ignore_index=True,
    )[["role", "method", "accuracy", "macro_f1", "log_loss", "chosen"]]
    state = {
        "members": names, "features": cfg.stack_features, "kind": result.kind, "classes": classes,
        "folds_csv": cfg.folds_csv, "chosen_by": cfg.stacker,
    }  # fmt: skip
    with atomic_dir(target) as staging:
        atomic_write(staging / STACK_MARKER, json.dumps(state, indent=2) + "\n")
        write_oof(staging / OOF, table_rows, log_probs(result.nested), classes, **oof_options(cfg, result.nested))
        with atomic_path(staging / "stack_report.csv") as tmp:
            report.to_csv(tmp, index=False)
        atomic_write(staging / "stack_report.md", text)
        save_config(cfg, staging / "config.yaml")
    log.info("chose %s; wrote %s", result.kind, target)
    return text


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(argv, __doc__.splitlines()[0], stage="stack")
    try:
        text = run(cfg)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
