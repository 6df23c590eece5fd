"""The one place images are decoded: resize, folds' duplicate hashing, and the training and prediction readers.

Every reader goes through :func:`decode` so that a training image and a raw test image of the same file
give the same pixels. Files are recognised by their content, never by their name: a JPEG called ``.jfif``,
a PNG called ``.jpg`` or a file without extension decodes as what it is. Decoding is OpenCV
(``cv2.imdecode``, fast and able to decode JPEGs at 1/2, 1/4 or 1/8 size straight from the DCT), except GIF
(OpenCV builds often lack a GIF decoder) and TIFF with alpha, which PIL decodes; PIL also reads the header
(:func:`probe`), lazily, to learn the size, the mode and the EXIF orientation before any pixel is decoded.

Channel policy, the contract for every reader:

- Output is always 8-bit: ``uint8`` arrays, ``HxWx3`` RGB or ``HxW`` grayscale.
- Grayscale sources (PIL modes ``1``, ``L``, ``I;16*``, ``I``, ``F``, ``LA``, and palette images whose
  colours are all gray) stay single-channel; every other source becomes 3-channel RGB.
- Alpha (RGBA, LA, palette or RGB with a transparent colour) is composited over a white background.
- 16-bit samples are scaled to 8 bits (divided by 257, rounded); 32-bit integer and float samples are
  stretched linearly from the image's own minimum..maximum to 0..255 (they carry no standard white point).
- Palette images are expanded; CMYK JPEGs are converted to RGB by the decoder.
- Animated images (GIF) give their first frame.
- EXIF orientation is applied here, from the tag PIL reads, never by OpenCV, so the result does not depend
  on the OpenCV version.

Files that cannot be used raise :class:`BadImage` with a short reason a person can act on.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from PIL import ExifTags, Image

# PIL's own guard warns or raises at its fixed limit; ours is the configurable max_pixels, checked in probe().
Image.MAX_IMAGE_PIXELS = None

# Twice PIL's own warning threshold (89,478,485 pixels), where PIL itself refuses a file as a bomb.
DEFAULT_MAX_PIXELS = 178_956_970
# Folders that hold no data of their own: macOS zip archives add resource forks there, named like the images.
SKIPPED_FOLDERS = frozenset({"__MACOSX"})

# MPO is the multi-picture JPEG of some cameras; its first image is the photo.
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# Decoded by PIL: OpenCV's GIF decoder is optional at build time (and absent before OpenCV 4.11).
_PIL_FORMATS = frozenset({"GIF"})
_FORMATS = _JPEG_FORMATS | _PIL_FORMATS | {"PNG", "BMP", "TIFF", "WEBP"}
_GRAY_MODES = frozenset({"1", "L", "I", "F", "LA", "La"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# The REDUCED_COLOR_* flags include the IMREAD_COLOR (BGR) bit, which OpenCV 5 refuses beside
# IMREAD_COLOR_RGB; the REDUCED_GRAYSCALE_* flags are the bare scale bits and combine with either.
_REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
# Entropy-coded JPEG data ends at the first marker that is not a stuffed 0xFF00 or a restart marker.
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


class BadImage(Exception):
    """A file that cannot be used as an image; the message is a short reason for a person."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says. width and height are after EXIF orientation, as the image is seen."""

    width: int
    height: int
    format: str
    mode: str
    orientation: int
    has_alpha: bool
    gray_palette: bool = False  # a palette image whose colours all have R = G = B

    @property
    def grayscale(self) -> bool:
        return self.mode in _GRAY_MODES or self.mode.startswith("I;16") or self.gray_palette


def is_skipped(rel: str) -> bool:
    """Whether :func:`find_images` leaves this relative path out: a hidden name (starting with ".") or a
    ``__MACOSX`` folder anywhere along it."""
    return any(part.startswith(".") or part in SKIPPED_FOLDERS for part in PurePosixPath(rel).parts)


def match_ids(ids: Sequence[str], files: Sequence[str]) -> list[int | None]:
    """Each id's file (its index in ``files``, relative posix paths): the same relative path, else the same
    path without extension, else the same file name (with or without extension), whichever is unique; None
    when no key or only an ambiguous one matches. Competitions list ids every one of these ways: the
    training list (folds.py) and the sample submission (predict.py) are both matched with it."""
    keys: list[dict[str, int | None]] = [{}, {}, {}, {}]
    for i, f in enumerate(files):
        p = PurePosixPath(f)
        for table, key in zip(keys, (f, str(p.with_suffix("")), p.name, p.stem), strict=True):
            table[key] = None if key in table else i  # None: ambiguous
    out: list[int | None] = []
    for raw in ids:
        key = raw.strip().replace("\\", "/")
        out.append(next((t[key] for t in keys if t.get(key) is not None), None))
    return out


def find_images(folder: Path) -> tuple[list[str], list[str]]:
    """Every file under ``folder`` that may be an image: (usable, escaping) relative posix paths, sorted.

    Files are not chosen by extension: whether one is an image is its content's business (:func:`decode`
    says why not), so every file gets listed, and resize reports the ones that are not images, and predict
    gives them a fallback row. Left out: hidden names (starting with "."; this covers the stages' own
    temporary files), ``__MACOSX`` folders, pipes and devices; symlinked folders are not followed. A
    symlinked file whose target lies outside ``folder`` is "escaping" (never read).

    Raises:
        OSError: ``folder`` cannot be listed.
    """
    folder = Path(folder)
    root = folder.resolve()
    usable: list[str] = []
    escaping: list[str] = []
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in SKIPPED_FOLDERS:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif _is_file(entry):
                    path = Path(entry.path)
                    rel = path.relative_to(folder).as_posix()
                    outside = entry.is_symlink() and not path.resolve().is_relative_to(root)
                    (escaping if outside else usable).append(rel)
    return sorted(usable), sorted(escaping)


def _is_file(entry: os.DirEntry) -> bool:
    """A regular file or a link to one; a broken link too, so that reading it reports the failure. Never a
    pipe or a device: reading one could block forever."""
    if entry.is_file(follow_symlinks=False):  # from the directory listing: no system call per file
        return True
    if not entry.is_symlink():
        return False
    try:
        return stat.S_ISREG(os.stat(entry.path).st_mode)
    except OSError:
        return True


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or malformed)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PIL would decode the whole PNG looking for a late eXIf chunk
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF must not make a readable image unusable
        return 1
    return value if value in range(1, 9) else 1


def _gray_palette(im: Image.Image) -> bool:
    """Whether a palette image's colours all have R = G = B (read from the header: no pixel is decoded).

    Such a file is a grayscale picture in a palette container (PIL saves grayscale GIFs so), and stays gray.
    """
    pal = im.palette
    if im.mode not in ("P", "PA") or pal is None or (getattr(pal, "rawmode", None) or pal.mode) != "RGB":
        return False
    rgb = np.frombuffer(bytes(pal.palette), np.uint8)
    rgb = rgb[: len(rgb) // 3 * 3].reshape(-1, 3)
    return len(rgb) > 0 and bool((rgb == rgb[:, :1]).all())


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read the header only: size after orientation, format, mode; refuse empty, unknown or huge files.

    The format comes from the content (PIL's signature checks), whatever the file is called.

    Raises:
        BadImage: empty file, not an image, an unsupported format, zero or more than ``max_pixels`` pixels.
    """
    if not data:
        raise BadImage("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types on garbage headers
        raise BadImage("not an image") from e
    with im:
        fmt, mode, (width, height) = im.format or "?", im.mode, im.size
        has_alpha = mode in _ALPHA_MODES or "transparency" in im.info
        orientation = _orientation(im)
        gray_palette = _gray_palette(im)
    if fmt not in _FORMATS:
        raise BadImage(f"unsupported image format {fmt}")
    if width < 1 or height < 1:
        raise BadImage(f"empty image ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} pixels > max_pixels {max_pixels}")
    if orientation >= 5:
        width, height = height, width
    return ImageInfo(width, height, fmt, mode, orientation, has_alpha, gray_palette)


def reduced_factor(long_side: int, target: int | None) -> int:
    """The largest JPEG DCT scale (8, 4, 2) that keeps the long side at least ``target``; 1 when none."""
    if target is not None:
        for factor in (8, 4, 2):
            if long_side // factor >= target:
                return factor
    return 1


def _jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG reaches an end-of-image marker after its last scan.

    Walks the segments by their lengths and skips entropy-coded data to its next marker, so an EXIF
    thumbnail or bytes appended after the image cannot fake or hide the end.
    """
    pos, end = 2, len(data)
    while pos + 2 <= end:
        if data[pos] != 0xFF:  # junk between segments: libjpeg skips to the next marker, so do we
            match = _JPEG_NEXT_MARKER.search(data, pos)
            if match is None:
                return False
            pos = match.start()
        marker = data[pos + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF:
            pos += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
        else:
            if pos + 4 > end:
                return False
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker == 0xDA:
                match = _JPEG_NEXT_MARKER.search(data, pos)
                if match is None:
                    return False
                pos = match.start()
    return False


def _png_complete(data: bytes) -> bool:
    """Whether the PNG's chunk chain reaches IEND."""
    pos = 8
    while pos + 8 <= len(data):
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return False


def _check_complete(data: bytes, fmt: str) -> None:
    if fmt in _JPEG_FORMATS and not _jpeg_complete(data):
        raise BadImage("truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and not _png_complete(data):
        raise BadImage("truncated PNG (no IEND chunk)")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    values = np.nan_to_num(img.astype(np.float64))
    lo, hi = float(values.min()), float(values.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.rint((values - lo) * scale).astype(np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite straight-alpha 8-bit colour over white: c*a/255 + 255*(1 - a/255), rounded."""
    c = colour.astype(np.uint16)
    a = alpha.astype(np.uint16)
    return ((255 * 255 + 127 - a * (255 - c)) // 255).astype(np.uint8)


def _decode_pixels(data: bytes, info: ImageInfo, factor: int) -> tuple[np.ndarray, bool]:
    """Raw decoder output and whether its channels are in BGR order; ``factor`` applies to JPEGs only."""
    # OpenCV's 8-bit TIFF path premultiplies colour by alpha and drops gray+alpha's alpha; PIL does not.
    if info.format in _PIL_FORMATS or (info.format == "TIFF" and info.has_alpha):
        return _decode_with_pil(data, info), False
    if info.format in _JPEG_FORMATS:
        colour = cv2.IMREAD_GRAYSCALE if info.grayscale else cv2.IMREAD_COLOR_RGB
        flags, bgr = _REDUCED[factor] | colour | cv2.IMREAD_IGNORE_ORIENTATION, False
    else:
        flags, bgr = cv2.IMREAD_UNCHANGED, True  # keeps depth and alpha; never applies EXIF orientation
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise BadImage(f"undecodable {info.format} ({str(e).strip().splitlines()[-1]})") from e
    if img is None or img.size == 0:
        raise BadImage(f"undecodable {info.format} data")
    return img, bgr


def _decode_with_pil(data: bytes, info: ImageInfo) -> np.ndarray:
    """The first frame through PIL: HxWx4 RGBA when the image has alpha, else HxW gray or HxWx3 RGB (uint8).

    Raises:
        BadImage: PIL cannot decode the pixels (truncated or corrupt data).
    """
    mode = "RGBA" if info.has_alpha else "L" if info.grayscale else "RGB"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            return np.asarray(im.convert(mode))
    except Exception as e:  # PIL raises many types on corrupt data
        raise BadImage(f"undecodable {info.format} ({e})") from e


def decode_with_info(
    data: bytes, target_long_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[ImageInfo, np.ndarray]:
    """:func:`probe` and :func:`decode` in one pass over the bytes (resize needs both).

    Raises:
        BadImage: see :func:`probe`; also truncated JPEG/PNG data and data the decoder refuses.
    """
    info = probe(data, max_pixels)
    _check_complete(data, info.format)
    factor = reduced_factor(max(info.width, info.height), target_long_side)
    img, bgr = _decode_pixels(data, info, factor)
    img = _to_uint8(img)
    if img.ndim == 3 and img.shape[2] in (2, 4):
        colour, alpha = img[..., :-1], img[..., -1:]
        img = _over_white(colour, alpha) if info.has_alpha else colour
        if img.shape[2] == 1:
            img = img[..., 0]
    if img.ndim == 3 and bgr:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if info.grayscale and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    elif not info.grayscale and img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if info.orientation in _ORIENT:
        img = _ORIENT[info.orientation](img)
    return info, np.ascontiguousarray(img)


def decode(
    data: bytes, target_long_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode image bytes under the channel policy above, upright.

    With ``target_long_side``, a JPEG is decoded at the smallest DCT scale whose long side is still at
    least the target (much faster than decoding everything and shrinking); the result is therefore not
    exactly the target size: follow with :func:`resize_array`. Other formats decode at full size.
    Returns ``HxWx3`` RGB or ``HxW`` gray ``uint8``.

    Raises:
        BadImage: the bytes are not a usable image (the message says why).
    """
    return decode_with_info(data, target_long_side, max_pixels)[1]


def read_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (grayscale replicated), for models that want three channels."""
    img = decode(Path(path).read_bytes(), max_pixels=max_pixels)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img


def resized_name(rel: str, image_format: str) -> str:
    """Output path of a source path: kept when its suffix already is the format, else the format appended.

    Appending (not replacing) keeps a.png and a.jpg apart: they become a.png.jpg and a.jpg. Names without
    an extension or with any other one (``x`` -> ``x.jpg``, ``x.gif`` -> ``x.gif.jpg``, ``x.jfif`` ->
    ``x.jfif.jpg``) get the format's. Only a source named like another's output can collide (``a`` and
    ``a.jpg``): resize keeps the file that keeps its own name and reports the other.
    """
    suffixes = {"jpg": (".jpg", ".jpeg"), "png": (".png",)}[image_format]
    return rel if PurePosixPath(rel).suffix.lower() in suffixes else f"{rel}.{image_format}"


def resize_array(
    img: np.ndarray, long_side: int, upscale: bool = False, letterbox: bool = False
) -> np.ndarray:
    """Scale so the long side is ``long_side``, keeping the aspect ratio; optionally pad to a black square.

    Shrinking uses INTER_AREA (no aliasing); enlarging, only with ``upscale``, uses INTER_CUBIC.
    """
    h, w = img.shape[:2]
    if max(h, w) > long_side or (upscale and max(h, w) < long_side):
        if w >= h:
            size = (long_side, max(1, round(h * long_side / w)))
        else:
            size = (max(1, round(w * long_side / h)), long_side)
        interpolation = cv2.INTER_AREA if max(h, w) > long_side else cv2.INTER_CUBIC
        img = cv2.resize(img, size, interpolation=interpolation)
        h, w = img.shape[:2]
    if letterbox and (h, w) != (long_side, long_side):
        top, left = (long_side - h) // 2, (long_side - w) // 2
        img = cv2.copyMakeBorder(
            img, top, long_side - h - top, left, long_side - w - left, cv2.BORDER_CONSTANT, value=0
        )
    return img
