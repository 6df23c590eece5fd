"""A member's inference preprocessing and its test-time views: one description for validation, package, predict.

A trained model is fed images made in two steps: the training pipeline's resize.py step (long side
``resize``, optional square ``letterbox``; a no-op on the resized copies training reads) and then
data.eval_transform at ``size`` (crop policy, the model's normalisation and interpolation, channels).
:class:`Preprocessing` holds exactly that; it is built from a checkpoint (:meth:`Preprocessing.of_checkpoint`),
recorded in the bundle's manifest (:meth:`to_dict`) and rebuilt there (:meth:`from_dict`), so train.py's
validation, package.py's OOF per view and predict.py's test images are made the same way.

Test-time views: ``orig`` (the plain input), flips ``hflip``, ``vflip``, ``rot180`` (applied to the input
tensor, so they share the plain input's decoding and resizing), and ``scale<F>`` (e.g. ``scale1.15``: the
input made at F x the member's size). :meth:`Preprocessing.view` is the one place that rule lives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from lib.config import FLIP_VIEWS, ORIG, view_scale
from lib.data import eval_transform
from lib.images import resize_array

# The input dimensions each flip view reverses (NCHW); config.py names the views.
FLIPS: dict[str, tuple[int, ...]] = {ORIG: (), "hflip": (3,), "vflip": (2,), "rot180": (2, 3)}
assert set(FLIPS) == {ORIG, *FLIP_VIEWS}
MIN_SIZE = 8  # a scale view never makes an input smaller than this many pixels


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """The view's flip of an NCHW batch (normalisation is per pixel, so flipping after it is exact)."""
    dims = FLIPS.get(view, ())
    return torch.flip(x, dims) if dims else x


@dataclass(frozen=True)
class Preprocessing:
    """How one model input is made from a decoded uint8 image (HxWx3 RGB or HxW gray).

    ``resize``: long side of the training copies (0: none), with ``upscale`` and ``letterbox`` as resize.py
    made them; ``size``: the square input side in pixels; ``crop``: rrc (shorter side to size, centre crop)
    or letterbox; ``mean``/``std``/``interpolation``: the model's normalisation and resampling;
    ``in_chans``: 1 (gray) or 3; ``channels_last``: the memory layout the model runs in.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    in_chans: int = 3
    crop: str = "rrc"
    resize: int = 0
    upscale: bool = False
    letterbox: bool = False
    channels_last: bool = True
    _transform: Any = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def of_checkpoint(cls, config: dict[str, Any], data_config: dict[str, Any]) -> Preprocessing:
        """From a checkpoint's (or a Config's ``asdict``) config and its model's data_config: ``img_size``
        0 means the model's pretrained size."""
        return cls(
            size=int(config.get("img_size") or data_config["img_size"]),
            mean=tuple(float(m) for m in data_config["mean"]), std=tuple(float(s) for s in data_config["std"]),
            interpolation=str(data_config["interpolation"]), in_chans=int(config.get("in_chans", 3)),
            crop=str(config.get("crop", "rrc")), resize=int(config.get("resize", 0)),
            upscale=bool(config.get("upscale", False)), letterbox=bool(config.get("letterbox", False)),
            channels_last=bool(config.get("channels_last", True)),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record (plain JSON values; ``img_size`` is the size)."""
        return {
            "img_size": self.size, "crop": self.crop, "resize": self.resize, "upscale": self.upscale,
            "letterbox": self.letterbox, "mean": list(self.mean), "std": list(self.std),
            "interpolation": self.interpolation, "in_chans": self.in_chans, "channels_last": self.channels_last,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls.of_checkpoint(record, record)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def view(self, view: str) -> Preprocessing:
        """The input ``view`` is computed from: scale<F> makes its own input at F x size; flips and orig
        share the plain input (the flip is applied to the tensor, :func:`apply_view`)."""
        if not view.startswith("scale"):
            return self
        return replace(self, size=max(MIN_SIZE, round(self.size * view_scale(view))), _transform=None)

    def transform(self) -> A.Compose:
        """data.eval_transform at this size (built once, cached)."""
        if self._transform is None:
            built = eval_transform(
                size=self.size, mean=self.mean, std=self.std, interpolation=self.interpolation,
                in_chans=self.in_chans, crop=self.crop,  # type: ignore[arg-type]
            )  # fmt: skip
            object.__setattr__(self, "_transform", built)
        return self._transform

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        """The model input (float32 CHW) of one decoded image."""
        if self.resize:
            img = resize_array(img, self.resize, self.upscale, self.letterbox)
        if self.in_chans == 1:
            gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            img = gray[..., None]  # as ImageDataset does for in_chans 1
        return self.transform()(image=img)["image"]


def group_views(pre: Preprocessing, views: Sequence[str]) -> dict[Preprocessing, list[str]]:
    """The views grouped by the input they are computed from (flips share the plain input)."""
    groups: dict[Preprocessing, list[str]] = {}
    for view in views:
        groups.setdefault(pre.view(view), []).append(view)
    return groups


def view_size(pre: Preprocessing, view: str) -> int:
    """The input side in pixels of ``view``."""
    return pre.view(view).size
