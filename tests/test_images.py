"""The shared decoder: bad files, the channel policy, orientation, reduced decoding, resizing."""

from __future__ import annotations

import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from lib.images import (
    BadImage,
    decode,
    decode_with_info,
    find_images,
    is_skipped,
    probe,
    read_rgb,
    reduced_factor,
    resize_array,
    resized_name,
)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def quadrants(h: int = 60, w: int = 80) -> np.ndarray:
    """Four flat colours, so orientation and channel order are visible even after JPEG."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 0)
    return img


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def jpeg_bytes() -> bytes:
    return encode(Image.fromarray(quadrants()), "JPEG", quality=95)


# One test per kind of bad file.


def test_zero_byte_file() -> None:
    with pytest.raises(BadImage, match=r"^empty file$"):
        decode(b"")


def test_truncated_jpeg() -> None:
    data = jpeg_bytes()
    with pytest.raises(BadImage, match=r"truncated JPEG \(no end-of-image marker\)"):
        decode(data[: len(data) * 2 // 3])


def test_truncated_png() -> None:
    data = encode(Image.fromarray(quadrants()), "PNG")
    with pytest.raises(BadImage, match="truncated PNG"):
        decode(data[:-20])


def test_text_file_is_not_an_image() -> None:
    with pytest.raises(BadImage, match=r"^not an image$"):
        decode(b"image,label\na.jpg,cat\n")


def test_decompression_bomb_by_max_pixels() -> None:
    with pytest.raises(BadImage, match=r"decompression bomb: 80x60 pixels > max_pixels 1000"):
        decode(jpeg_bytes(), max_pixels=1000)


def test_decompression_bomb_by_header_claiming_huge_size() -> None:
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )
    with pytest.raises(BadImage, match=r"decompression bomb: 20000x20000 pixels > max_pixels 178956970"):
        probe(data)


def test_unsupported_format() -> None:
    with pytest.raises(BadImage, match="unsupported image format PCX"):
        decode(encode(Image.fromarray(quadrants()), "PCX"))


def test_bytes_after_the_end_of_a_jpeg_are_harmless() -> None:
    """Camera trailers may contain FF DA (start-of-scan) bytes; the JPEG itself is still complete."""
    data = jpeg_bytes() + b"\xff\xda\x00\x08trailer" + bytes(range(256))
    assert decode(data).shape == (60, 80, 3)


# Orientation.


def test_exif_orientation_6_rotates_a_jpeg() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = encode(Image.fromarray(quadrants()), "JPEG", quality=95, exif=exif.tobytes())
    info, img = decode_with_info(data)
    assert (info.width, info.height, info.orientation) == (60, 80, 6)
    assert img.shape == (80, 60, 3)
    # Rotated 90° clockwise: the top-left red quadrant ends at the top right, blue at the top left.
    np.testing.assert_allclose(img[5, -5], (255, 0, 0), atol=8)
    np.testing.assert_allclose(img[5, 5], (0, 0, 255), atol=8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil(orientation: int) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    pixels = np.random.default_rng(orientation).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    np.testing.assert_array_equal(decode(data), expected)


# Channel policy.


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_stays_single_channel(fmt: str) -> None:
    data = encode(Image.new("L", (40, 30), 77), fmt)
    img = decode(data)
    assert img.shape == (30, 40)
    assert img.dtype == np.uint8
    assert abs(int(img[10, 10]) - 77) <= 1


def test_rgba_is_composited_over_white() -> None:
    pixels = np.zeros((30, 40, 4), np.uint8)
    pixels[:, :10] = (200, 100, 50, 255)  # opaque
    pixels[:, 10:20] = (200, 100, 50, 0)  # transparent
    pixels[:, 20:] = (200, 100, 50, 128)  # half
    img = decode(encode(Image.fromarray(pixels), "PNG"))
    assert img.shape == (30, 40, 3)
    assert tuple(img[0, 0]) == (200, 100, 50)
    assert tuple(img[0, 15]) == (255, 255, 255)
    expected = [round(c * 128 / 255 + 255 - 128) for c in (200, 100, 50)]
    assert list(img[0, 30]) == expected


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_alpha_is_composited_the_same_in_every_format(fmt: str) -> None:
    """OpenCV premultiplies 8-bit TIFF alpha; the policy must not depend on the container."""
    im = Image.new("RGBA", (40, 30), (200, 100, 50, 128))
    img = decode(encode(im, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert tuple(img[0, 0]) == (227, 177, 152)


def test_gray_with_alpha_stays_single_channel() -> None:
    img = decode(encode(Image.new("LA", (40, 30), (200, 128)), "PNG"))
    assert img.shape == (30, 40)
    assert img[0, 0] == round(200 * 128 / 255 + 255 - 128)


def test_16_bit_png_is_scaled_to_8_bit() -> None:
    values = np.array([[0, 300, 128 * 257, 100 * 257 + 128, 65535]], np.uint16)
    ok, data = cv2.imencode(".png", values)
    assert ok
    img = decode(data.tobytes())
    assert img.dtype == np.uint8
    assert img.tolist() == [[0, 1, 128, 100, 255]]


def test_16_bit_colour_png_is_scaled_to_8_bit_rgb() -> None:
    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[:] = (65535, 128 * 257, 257)
    ok, data = cv2.imencode(".png", rgb[..., ::-1])
    assert ok
    img = decode(data.tobytes())
    assert img.shape == (4, 5, 3)
    assert tuple(img[0, 0]) == (255, 128, 1)


def test_float_tiff_is_stretched_to_8_bit() -> None:
    ramp = np.linspace(-1.0, 3.0, 5, dtype=np.float32).reshape(1, 5)
    img = decode(encode(Image.fromarray(ramp), "TIFF"))
    assert img.tolist() == [[0, 64, 128, 191, 255]]


def test_palette_png_is_expanded() -> None:
    palette = [0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9)
    im = Image.new("P", (40, 30), 2)
    im.putpalette(palette)
    im.paste(1, (0, 0, 20, 30))
    img = decode(encode(im, "PNG"))
    assert img.shape == (30, 40, 3)
    assert tuple(img[0, 0]) == (10, 20, 30)
    assert tuple(img[0, 30]) == (200, 100, 50)


def test_palette_transparency_is_composited_over_white() -> None:
    im = Image.new("P", (40, 30), 2)
    im.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    im.paste(1, (0, 0, 20, 30))
    img = decode(encode(im, "PNG", transparency=1))
    assert tuple(img[0, 0]) == (255, 255, 255)
    assert tuple(img[0, 30]) == (200, 100, 50)


def test_gray_palette_stays_gray() -> None:
    im = Image.new("P", (40, 30), 2)
    im.putpalette([0, 0, 0, 90, 90, 90, 200, 200, 200] + [0] * (256 * 3 - 9))
    im.paste(1, (0, 0, 20, 30))
    for fmt in ("PNG", "GIF"):
        info, img = decode_with_info(encode(im, fmt))
        assert info.grayscale and img.shape == (30, 40)
        assert (img[0, 0], img[0, 30]) == (90, 200)


def test_gif_first_frame_with_transparency_over_white() -> None:
    """OpenCV builds often lack GIF: PIL decodes it, first frame only, palette expanded, alpha over white."""
    first = np.zeros((30, 40, 4), np.uint8)
    first[..., :3] = (200, 100, 50)
    first[:, 20:, 3] = 255  # left half transparent
    frames = [Image.fromarray(first, "RGBA"), Image.new("RGBA", (40, 30), (0, 0, 255, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    info, img = decode_with_info(data)
    assert info.format == "GIF" and info.has_alpha
    assert img.shape == (30, 40, 3)
    assert tuple(img[0, 0]) == (255, 255, 255) and tuple(img[0, 30]) == (200, 100, 50)


def test_gif_colour_and_truncated() -> None:
    data = encode(Image.fromarray(quadrants()).convert("P"), "GIF")
    np.testing.assert_array_equal(decode(data), quadrants())  # four colours survive the palette
    with pytest.raises(BadImage, match=r"^undecodable GIF"):
        decode(data[: len(data) // 2])


def test_content_decides_the_format_not_the_name(tmp_path) -> None:
    """A .jfif JPEG, a PNG named .jpg and a file without extension decode as what they are."""
    jpeg_data, png_data = jpeg_bytes(), encode(Image.fromarray(quadrants()), "PNG")
    for name, data, fmt in (("a.jfif", jpeg_data, "JPEG"), ("b.jpg", png_data, "PNG"), ("c", jpeg_data, "JPEG")):
        (tmp_path / name).write_bytes(data)
        info, img = decode_with_info((tmp_path / name).read_bytes())
        assert info.format == fmt and img.shape == (60, 80, 3)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("RGB", (40, 30), (200, 100, 50)).convert("CMYK"), "JPEG", quality=95)
    info, img = decode_with_info(data)
    assert info.mode == "CMYK"
    assert img.shape == (30, 40, 3)
    np.testing.assert_allclose(img[15, 20], (200, 100, 50), atol=4)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP", "PNG"])
def test_lossless_formats_decode_to_rgb(fmt: str) -> None:
    pixels = quadrants(30, 40)
    img = decode(encode(Image.fromarray(pixels), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    np.testing.assert_array_equal(img, pixels)


def test_read_rgb_replicates_grayscale(tmp_path) -> None:
    path = tmp_path / "g.png"
    Image.new("L", (40, 30), 77).save(path)
    img = read_rgb(path)
    assert img.shape == (30, 40, 3)
    assert tuple(img[0, 0]) == (77, 77, 77)


# Reduced decoding.


@pytest.mark.parametrize(
    ("long_side", "target", "factor"),
    [(2000, 500, 4), (2000, 499, 4), (2000, 501, 2), (2000, 250, 8), (2000, 100, 8), (300, 600, 1),
     (1999, 1000, 1), (2000, None, 1)],
)
def test_reduced_factor(long_side: int, target: int | None, factor: int) -> None:
    assert reduced_factor(long_side, target) == factor


def test_big_jpeg_is_decoded_reduced() -> None:
    """A 1600x1200 JPEG asked for 200 px is decoded at 1/8 scale by the JPEG decoder itself."""
    big = cv2.resize(quadrants(), (1600, 1200), interpolation=cv2.INTER_NEAREST)
    img = decode(encode(Image.fromarray(big), "JPEG", quality=90), target_long_side=200)
    assert img.shape == (150, 200, 3)
    np.testing.assert_allclose(img[10, 10], (255, 0, 0), atol=8)


def test_png_with_target_decodes_full_size() -> None:
    img = decode(encode(Image.fromarray(quadrants()), "PNG"), target_long_side=10)
    assert img.shape == (60, 80, 3)


# Naming and resizing.


def test_find_images_lists_every_file_whatever_its_name(tmp_path) -> None:
    """Content decides what is an image, so every file is listed; hidden names, __MACOSX, folders behind
    links and pipes are not (a pipe would block its reader)."""
    for rel in ["a.jpg", "noext", "x.gif", "y.jfif", "notes.txt", "_under.png", "sub/b.PNG", ".hidden.jpg",
                ".cache/c.jpg", "__MACOSX/._a.jpg", "sub/__MACOSX/d.jpg"]:  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "dirlink").symlink_to(tmp_path / "sub", target_is_directory=True)
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path.parent / "outside.jpg").write_bytes(b"x")
    (tmp_path / "out.jpg").symlink_to(tmp_path.parent / "outside.jpg")
    usable, escaping = find_images(tmp_path)
    assert usable == ["_under.png", "a.jpg", "broken.jpg", "noext", "notes.txt", "sub/b.PNG", "x.gif", "y.jfif"]
    assert escaping == ["out.jpg"]


@pytest.mark.parametrize(
    ("rel", "skipped"),
    [("a.jpg", False), ("_a.jpg", False), (".a.jpg", True), ("d/.x/a.jpg", True), ("__MACOSX/a.jpg", True)],
)
def test_is_skipped_matches_find_images(rel: str, skipped: bool) -> None:
    assert is_skipped(rel) is skipped


@pytest.mark.parametrize(
    ("rel", "fmt", "out"),
    [("a.jpg", "jpg", "a.jpg"), ("d/a.JPEG", "jpg", "d/a.JPEG"), ("a.png", "jpg", "a.png.jpg"),
     ("a.png", "png", "a.png"), ("a.jpg", "png", "a.jpg.png"), ("a.webp", "jpg", "a.webp.jpg"),
     ("noext", "jpg", "noext.jpg"), ("d.x/noext", "png", "d.x/noext.png"), ("a.gif", "jpg", "a.gif.jpg"),
     ("a.jfif", "jpg", "a.jfif.jpg"), ("a.tar.gz", "jpg", "a.tar.gz.jpg"), ("a.", "jpg", "a..jpg")],
)
def test_resized_name(rel: str, fmt: str, out: str) -> None:
    assert resized_name(rel, fmt) == out


def test_resized_names_never_collide_across_formats() -> None:
    assert resized_name("a.png", "jpg") != resized_name("a.jpg", "jpg")
    assert resized_name("a.png", "png") != resized_name("a.jpg", "png")


@pytest.mark.parametrize(
    ("h", "w", "expected"), [(150, 200, (48, 64)), (200, 90, (64, 29)), (64, 64, (64, 64))]
)
def test_resize_keeps_aspect_and_sets_long_side(h: int, w: int, expected: tuple[int, int]) -> None:
    assert resize_array(np.zeros((h, w, 3), np.uint8), 64).shape[:2] == expected


def test_no_upscaling_by_default() -> None:
    assert resize_array(np.zeros((30, 40), np.uint8), 64).shape == (30, 40)


def test_upscaling_when_asked() -> None:
    assert resize_array(np.zeros((30, 40), np.uint8), 64, upscale=True).shape == (48, 64)


def test_letterbox_pads_to_a_centred_black_square() -> None:
    img = resize_array(np.full((100, 200, 3), 255, np.uint8), 64, letterbox=True)
    assert img.shape == (64, 64, 3)
    assert img[:16].max() == 0 and img[48:].max() == 0
    assert img[16:48].min() == 255


def test_letterbox_without_upscaling_pads_small_images() -> None:
    img = resize_array(np.full((20, 30), 255, np.uint8), 64, letterbox=True)
    assert img.shape == (64, 64)
    assert img.sum() == 20 * 30 * 255
