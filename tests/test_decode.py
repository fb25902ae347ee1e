"""ifcn.image: every odd input becomes RGB with the right pixels, or one ImageError line.

All images are generated in memory with PIL (or written byte by byte for PNG variants PIL
cannot save), so the expected pixels are known exactly.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from ifcn.image import ImageError, decode_image, read_bytes

URI = "s3://b/x.jpg"


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes | None) -> bytes:
    """A PNG written by hand: lets us make 16-bit RGB and lying headers that PIL will not save."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(raw_rows)) if raw_rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def quadrants(w: int = 64, h: int = 32) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right (JPEG-proof blocks)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 255)
    return Image.fromarray(a)


def assert_close(pixel: np.ndarray, expected: tuple[int, int, int], tol: int) -> None:
    assert np.abs(pixel.astype(int) - np.array(expected)).max() <= tol, (pixel, expected)


# ---------------------------------------------------------------- plain and converted modes

def test_rgb_png_is_exact():
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(a), "PNG"), URI)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert out.flags.writeable and out.flags.c_contiguous  # torch.from_numpy takes it without a warning
    np.testing.assert_array_equal(out, a)


def test_grayscale_and_bilevel_expand_to_equal_channels():
    g = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    out = decode_image(encode(Image.fromarray(g, "L"), "PNG"), URI)
    np.testing.assert_array_equal(out, np.repeat(g[:, :, None], 3, axis=2))
    bits = Image.fromarray(g > 100).convert("1")
    out = decode_image(encode(bits, "PNG"), URI)
    np.testing.assert_array_equal(out[:, :, 0], np.where(g > 100, 255, 0))


def test_palette_maps_to_palette_colours_and_transparent_index_to_white():
    idx = np.array([[0, 1], [2, 1]], np.uint8).repeat(16, 0).repeat(16, 1)  # (32, 32)
    im = Image.fromarray(idx, "P")
    im.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (256 * 3 - 9))
    out = decode_image(encode(im, "PNG"), URI)
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[0, 20]) == (200, 100, 50) and tuple(out[20, 0]) == (0, 0, 0)
    out = decode_image(encode(im, "PNG", transparency=2), URI)  # index 2 transparent
    assert tuple(out[20, 0]) == (255, 255, 255) and tuple(out[0, 0]) == (10, 20, 30)
    out = decode_image(encode(im, "GIF", transparency=2), URI)
    assert tuple(out[20, 0]) == (255, 255, 255) and tuple(out[0, 20]) == (200, 100, 50)


def test_rgba_is_composited_on_white():
    a = np.zeros((16, 48, 4), np.uint8)
    a[:, :16] = (200, 0, 0, 255)  # opaque: unchanged
    a[:, 16:32] = (0, 0, 0, 0)  # transparent black: white, not black
    a[:, 32:] = (0, 0, 0, 128)  # half: 255 * (1 - 128/255) = 127
    out = decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"), URI)
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[0, 20]) == (255, 255, 255)
    assert_close(out[0, 40], (127, 127, 127), 1)


def test_la_is_composited_on_white():
    a = np.zeros((16, 32, 2), np.uint8)
    a[:, :16] = (60, 255)
    a[:, 16:] = (60, 0)
    out = decode_image(encode(Image.fromarray(a, "LA"), "PNG"), URI)
    assert tuple(out[0, 0]) == (60, 60, 60) and tuple(out[0, 20]) == (255, 255, 255)


def test_16bit_gray_png_scales_monotonically_to_full_8bit_range():
    v = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    data = encode(Image.fromarray(v), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # the case Pillow's own convert("RGB") clips
    out = decode_image(data, URI)
    flat = out[:, :, 0].reshape(-1).astype(int)
    assert flat[0] == 0 and flat[-1] == 255
    assert np.all(np.diff(flat) >= 0)
    np.testing.assert_array_equal(out[:, :, 0], np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8))
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_16bit_rgb_png_keeps_colour():
    h, w = 16, 32
    rgb16 = np.zeros((h, w, 3), np.uint16)
    rgb16[..., 0] = 65535  # red full
    rgb16[..., 1] = np.linspace(0, 65535, w).astype(np.uint16)[None, :]  # green ramp
    rgb16[..., 2] = 32768
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    out = decode_image(png_bytes(w, h, 16, 2, rows), URI)
    assert out.shape == (h, w, 3)
    expected = np.round(rgb16.astype(np.float64) * 255 / 65535)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_32bit_int_image_in_16bit_range_is_scaled_and_outside_is_an_error():
    v = np.array([[0, 1000, 65535, 30000]] * 16, np.int32).repeat(4, 1)
    out = decode_image(encode(Image.fromarray(v, "I"), "TIFF"), URI)
    assert list(out[0, ::4, 0]) == [0, 4, 255, 117]
    big = encode(Image.fromarray(np.full((16, 16), 70000, np.int32), "I"), "TIFF")
    with pytest.raises(ImageError, match="outside 0..65535"):
        decode_image(big, URI)


def test_cmyk_jpeg_converts_to_rgb():
    im = Image.new("CMYK", (32, 32), (255, 0, 0, 0))  # pure cyan
    im.paste((0, 0, 0, 255), (0, 16, 32, 32))  # pure black bottom half
    data = encode(im, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, URI)
    assert_close(out[4, 4], (0, 255, 255), 8)
    assert_close(out[28, 4], (0, 0, 0), 8)


def test_first_frame_of_animated_gif():
    frames = [Image.new("P", (20, 20), c) for c in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(decode_image(data, URI)[0, 0]) == (255, 0, 0)


# ---------------------------------------------------------------- EXIF orientation

@pytest.mark.parametrize("orientation, shape, corners", [
    # Corners of the displayed image: (top-left, top-right, bottom-left, bottom-right).
    (1, (32, 64), ("r", "g", "b", "w")),
    (3, (32, 64), ("w", "b", "g", "r")),  # rotated 180
    (6, (64, 32), ("b", "r", "w", "g")),  # stored sideways: display turns it 90 degrees clockwise
    (8, (64, 32), ("g", "w", "r", "b")),  # 90 degrees counter-clockwise
])
def test_exif_orientation_is_applied(orientation, shape, corners):
    colours = {"r": (255, 0, 0), "g": (0, 255, 0), "b": (0, 0, 255), "w": (255, 255, 255)}
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(quadrants(64, 32), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, URI)
    assert out.shape[:2] == shape
    h, w = shape
    for (y, x), name in zip([(2, 2), (2, w - 3), (h - 3, 2), (h - 3, w - 3)], corners):
        assert_close(out[y, x], colours[name], 12)


# ---------------------------------------------------------------- bad inputs: one line each

@pytest.mark.parametrize("data, words", [
    (b"", "empty file"),
    (b"<html><body>403 Forbidden</body></html>", "not a decodable image (got b'<htm')"),
    (b"\x00" * 100, "not a decodable image (got b'\\x00\\x00\\x00\\x00')"),
    (b"GIF89a", "not a decodable image"),  # a header cut off
])
def test_non_images_are_errors_naming_uri_and_first_bytes(data, words):
    with pytest.raises(ImageError) as info:
        decode_image(data, URI)
    reason = info.value.reason
    assert reason.startswith(f"image {URI}: ") and words in reason and "\n" not in reason
    assert reason.endswith("recorded as error row") and str(info.value) == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_errors(fmt):
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], URI)


def test_corrupted_png_data_is_an_error():
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = bytearray(encode(Image.fromarray(noise), "PNG"))
    data[200:260] = b"\xff" * 60  # inside IDAT: CRC and zlib stream both broken
    with pytest.raises(ImageError, match=r"image s3://b/x\.jpg: PNG data is corrupt"):
        decode_image(bytes(data), URI)


def test_unsupported_mode_names_the_mode():
    data = encode(Image.fromarray(np.zeros((20, 20), np.float32), "F"), "TIFF")
    with pytest.raises(ImageError, match="unsupported pixel mode 'F'"):
        decode_image(data, URI)


def test_small_images_are_errors_and_min_side_is_inclusive():
    data = encode(Image.new("RGB", (100, 15)), "PNG")
    with pytest.raises(ImageError, match="100x15 px is smaller than min_side=16"):
        decode_image(data, URI)
    assert decode_image(encode(Image.new("RGB", (100, 16)), "PNG"), URI).shape == (16, 100, 3)
    assert decode_image(data, URI, min_side=1).shape == (15, 100, 3)


def test_oversized_image_is_rejected_from_the_header_without_decoding(monkeypatch):
    data = encode(Image.new("RGB", (300, 200)), "PNG")

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageError, match="300x200 px = 60000 px exceeds max_pixels=59999"):
        decode_image(data, URI, max_pixels=59999)


def test_lying_header_is_rejected_before_any_allocation():
    # 100000 x 100000 RGB would be 30 GB decoded; the file has no pixel data at all.
    huge = png_bytes(100_000, 100_000, 8, 2, None)
    with pytest.raises(ImageError, match="exceeds max_pixels=50000000"):
        decode_image(huge, URI)
    # Above our limit but past Pillow's decompression-bomb limit too: still one ImageError.
    with pytest.raises(ImageError, match="decompression-bomb"):
        decode_image(huge, URI, max_pixels=10**12)


# ---------------------------------------------------------------- read_bytes

def test_read_bytes_local_paths_and_missing(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(b"abc")
    assert read_bytes(str(p)) == b"abc"
    assert read_bytes(p.as_uri()) == b"abc"
    with pytest.raises(ImageError, match=r"missing\.png: no such file"):
        read_bytes(str(tmp_path / "missing.png"))


# --- the read stage's decoder (pipeline.stages.read.decode): simplejpeg for JPEGs, this module otherwise ---------

def _photo(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 1.3 + yy * 0.7) % 256, (xx * 0.4 + 60) % 256, (yy * 1.1 + 30) % 256], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kw", [{"quality": 90}, {"quality": 75, "subsampling": 0}, {"quality": 95, "subsampling": 1},
                                {"quality": 85, "gray": True}, {"quality": 90, "progressive": True}])
def test_fast_jpeg_decoder_equals_pillow_within_a_level(kw):
    """libjpeg-turbo through simplejpeg vs Pillow: the same IDCT and upsampling; at most one level apart."""
    from pipeline.stages.read import decode

    im = Image.fromarray(_photo())
    if kw.pop("gray", False):
        im = im.convert("L")
    data = encode(im, "JPEG", **kw)
    got, want = decode(data, URI, 10**8, 16), decode_image(data, URI, 10**8, 16)
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_fast_decoder_is_used_when_installed_and_falls_back_for_exif_and_cmyk(monkeypatch):
    import pipeline.stages.read as sources

    simplejpeg = pytest.importorskip("simplejpeg")
    assert sources._simplejpeg is simplejpeg  # pinned in pyproject: the read stage uses it
    calls = []
    monkeypatch.setattr(sources, "decode_image", lambda *a: calls.append(a) or decode_image(*a))
    sources.decode(encode(Image.fromarray(_photo()), "JPEG"), URI, 10**8, 16)
    assert calls == []  # a plain JPEG never reaches Pillow
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: only the reference path applies EXIF orientation
    rotated = encode(Image.fromarray(_photo()), "JPEG", exif=exif.tobytes())
    assert sources.decode(rotated, URI, 10**8, 16).shape == (160, 120, 3) and len(calls) == 1
    exif[0x0112] = 1  # EXIF that does not rotate (most cameras' photos): the fast path, same pixels within 1
    upright = encode(Image.fromarray(_photo()), "JPEG", exif=exif.tobytes())
    got = sources.decode(upright, URI, 10**8, 16)
    assert len(calls) == 1 and np.abs(got.astype(int) - decode_image(upright, URI, 10**8, 16).astype(int)).max() <= 1
    cmyk = encode(Image.fromarray(_photo()).convert("CMYK"), "JPEG")
    assert np.array_equal(sources.decode(cmyk, URI, 10**8, 16), decode_image(cmyk, URI, 10**8, 16))


@pytest.mark.parametrize("case", ["truncated", "oversized", "small"])
def test_fast_decoder_errors_are_the_reference_errors(case):
    from pipeline.stages.read import decode

    data = encode(Image.fromarray(_photo()), "JPEG")
    args = {"truncated": (data[:200], 10**8, 16), "oversized": (data, 1000, 16), "small": (data, 10**8, 200)}[case]
    with pytest.raises(ImageError) as got:
        decode(args[0], URI, *args[1:])
    with pytest.raises(ImageError) as want:
        decode_image(args[0], URI, *args[1:])
    assert got.value.reason == want.value.reason


def test_read_stage_decodes_into_one_buffer_with_the_decoders_pixels(tmp_path):
    """read_images decodes JPEGs straight into the pixels column: each row equals `decode` of its file,
    through PNGs, gray JPEGs, a JPEG whose header reads but whose body is cut (simplejpeg fails in
    place, the reference path makes it an error row) and a missing file."""
    import pyarrow as pa

    from pipeline.stages.infer import pixels_at
    from pipeline.stages.read import decode, read_images

    photo = Image.fromarray(_photo())
    files = {"a.jpg": encode(photo, "JPEG"), "b.png": encode(photo, "PNG"),
             "c.jpg": encode(photo.convert("L"), "JPEG"), "d.jpg": encode(photo, "JPEG")[:700],
             "e.jpg": encode(Image.fromarray(_photo(64, 48, seed=1)), "JPEG", quality=75)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [f"file://{tmp_path / n}" for n in [*files, "missing.jpg"]]
    out = read_images(pa.table({"image_id": uris, "uri": uris, "shard_id": ["0"] * len(uris)}), None, 10**8, 16)
    rows = out.select(["status", "height", "width"]).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error", "ok", "error"]
    pixels = out.column("pixels").combine_chunks()
    for i, (name, data) in enumerate(files.items()):
        if rows[i]["status"] == "ok":
            want = decode(data, uris[i], 10**8, 16)
            assert np.array_equal(pixels_at(pixels, i, rows[i]["height"], rows[i]["width"]), want), name
        else:
            assert len(pixels[i].as_py()) == 0 and rows[i]["height"] is None
