"""The one image loader: bad files give an ImageError with the right reason, unusual but valid files
decode to correct 8-bit RGB, and nothing but ImageError ever comes out of it."""

from __future__ import annotations

import io
import random
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import badfiles  # noqa: E402
from imgclf.data.images import (  # noqa: E402
    ImageError,
    decode_image_bytes,
    is_image_name,
    load_image,
    to_rgb,
)


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return badfiles.some_photos(3)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, photos) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad") / "mixed"
    return root, badfiles.make_bad_folder(root, photos)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------- the generator itself


def test_bad_folder_is_complete_small_and_fast(tmp_path, photos):
    start = time.perf_counter()
    expected = badfiles.make_bad_folder(tmp_path / "mixed", photos)
    elapsed = time.perf_counter() - start
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == sorted(expected)
    assert elapsed < 3.0, f"generating the bad folder took {elapsed:.1f} s"
    bomb = tmp_path / "mixed" / "bomb.png"
    assert bomb.stat().st_size < 1_000_000
    header = bomb.read_bytes()[:24]  # (Pillow itself refuses to open it)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    assert struct.unpack(">II", header[16:24]) == (badfiles.BOMB_SIDE, badfiles.BOMB_SIDE)
    data = bomb.read_bytes()  # and its pixel data is complete: one chunk of IDAT, all rows there
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    inflater, total, stream = zlib.decompressobj(), 0, data[idat + 4 : idat + 4 + length]
    while stream:
        total += len(inflater.decompress(stream, 1 << 24))
        stream = inflater.unconsumed_tail
    assert total == badfiles.BOMB_SIDE * (1 + badfiles.BOMB_SIDE // 8) and inflater.eof
    assert (tmp_path / "mixed" / "empty.jpg").stat().st_size == 0
    with Image.open(tmp_path / "mixed" / "png_named.jpg") as image:
        assert image.format == "PNG"
    with Image.open(tmp_path / "mixed" / "sixteen.png") as image:
        assert image.mode in ("I;16", "I") and image.getextrema() == (0, 65535)
    with Image.open(tmp_path / "mixed" / "animated.gif") as image:
        assert image.n_frames == 3
    with Image.open(tmp_path / "mixed" / "rotated.jpg") as image:
        assert image.getexif().get(0x0112) == 6


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize("name", sorted(badfiles.ERRORS))
def test_bad_file_reason(bad, name):
    root, expected = bad
    with pytest.raises(ImageError) as caught:
        load_image(root / name)
    assert expected[name] in caught.value.reason
    assert caught.value.path == str(root / name)
    assert name in str(caught.value)


@pytest.mark.parametrize("name", sorted(badfiles.ERRORS))
def test_bad_file_reason_same_with_draft_and_from_bytes(bad, name):
    """The audit decodes bytes in draft mode: it must see the same problems."""
    root, expected = bad
    with pytest.raises(ImageError) as caught:
        decode_image_bytes((root / name).read_bytes(), name, draft_size=32)
    assert expected[name] in caught.value.reason


def test_truncated_jpeg_is_never_silently_accepted(photos):
    full = photos[0].read_bytes()
    for cut in (0.3, 0.6, 0.9):
        with pytest.raises(ImageError, match="truncated"):
            decode_image_bytes(full[: int(len(full) * cut)], "cut.jpg")
        with pytest.raises(ImageError, match="truncated"):
            decode_image_bytes(full[: int(len(full) * cut)], "cut.jpg", draft_size=32)


def test_bomb_is_refused_fast(bad):
    root, _ = bad
    start = time.perf_counter()
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(root / "bomb.png")
    assert time.perf_counter() - start < 1.0  # refused from the header, no pixel decoded


def test_max_pixels_argument(photos):
    with pytest.raises(ImageError, match=r"too many pixels \(\d+x\d+"):
        load_image(photos[0], max_pixels=10_000)
    assert load_image(photos[0], max_pixels=10_000_000).mode == "RGB"


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="cannot read file"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize(
    "head, reason",
    [
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "unsupported format (PDF)"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1" + bytes(64), "AVIF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "PostScript/EPS"),
        (b"SIMPLE  =                    T" + b" " * 50, "FITS"),
        (b"8BPS\x00\x01" + bytes(40), "unsupported format (PSD)"),
        (b"<html><body>404</body></html>", "not an image"),
    ],
)
def test_formats_outside_allowlist(tmp_path, head, reason):
    path = tmp_path / "x.jpg"
    path.write_bytes(head)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert reason in caught.value.reason


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "TGA", "ICO", "SGI", "DDS", "QOI", "XBM", "JPEG2000"])
def test_pillow_formats_outside_allowlist_are_refused_by_name(tmp_path, fmt):
    """Pillow could decode these; the loader must not even try (allowlist before any decoder), and
    says which format it refused (BAD_INPUTS case 10), even under a .jpg name."""
    path = tmp_path / "x.jpg"
    image = Image.new("1" if fmt == "XBM" else "RGB", (40, 40))
    try:
        image.save(path, fmt)
    except (KeyError, OSError, ValueError) as exc:  # a writer Pillow lacks here
        pytest.skip(f"Pillow cannot write {fmt}: {exc}")
    with pytest.raises(ImageError) as caught:
        load_image(path)
    expected = {"PPM": "PPM/PGM/PBM", "JPEG2000": "JPEG 2000"}.get(fmt, fmt)
    assert caught.value.reason == f"unsupported format ({expected})"


def test_formats_without_a_signature_are_named_by_extension(tmp_path):
    path = tmp_path / "logo.svg"
    path.write_bytes(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>')
    with pytest.raises(ImageError, match=r"unsupported format \(SVG\)"):
        load_image(path)
    (tmp_path / "chart.gd").write_bytes(b"\xff\xfe\x00\x10\x00\x10\x01" + bytes(300))
    with pytest.raises(ImageError, match=r"unsupported format \(GD\)"):
        load_image(tmp_path / "chart.gd")


def test_heic_is_read_with_the_plugin_and_named_without_it(tmp_path, monkeypatch):
    """BAD_INPUTS case 11: with pillow-heif (the test extra has it) a HEIC photo decodes like any
    other; the reason given without the plugin names the package that reads it."""
    from imgclf.data.images import _sniff_unsupported

    pytest.importorskip("pillow_heif")
    path = tmp_path / "IMG_0001.HEIC"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, "HEIF")
    image = load_image(path)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - (200, 30, 30)).max() < 12
    assert is_image_name(path), "folder scans list HEIC files"
    import imgclf.data.images as images

    monkeypatch.setattr(images, "ALLOWED_FORMATS", tuple(f for f in images.ALLOWED_FORMATS if f != "HEIF"))
    reason = _sniff_unsupported(path.read_bytes(), str(path))
    assert "HEIC" in reason and "pip install 'imgclf[heic]'" in reason


def test_fifo_device_and_huge_files_are_never_read_whole(tmp_path):
    """BAD_INPUTS case 48: a FIFO named .jpg does not hang, a device is not read, and a file over
    the size cap is refused from its size."""
    import os
    import time

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"not a regular file \(a FIFO\)"):
        load_image(fifo)
    assert time.perf_counter() - started < 2
    with pytest.raises(ImageError, match=r"not a regular file \(a device\)"):
        load_image("/dev/zero")
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.truncate(3 * 2**30)  # sparse: 3 GB on paper, nothing on disk
    with pytest.raises(ImageError, match=r"too large \(3072 MB"):
        load_image(huge)


# ---------------------------------------------------------------- unusual but valid files


@pytest.mark.parametrize("name", badfiles.VALID + ["tiny.png"])
def test_valid_unusual_files_load_as_rgb(bad, name):
    root, expected = bad
    image = load_image(root / name)
    assert image.mode == "RGB"
    assert image.width > 0 and image.height > 0
    assert expected[name] in (badfiles.OK, badfiles.TOO_SMALL)


def test_png_named_jpg_decoded_by_content(bad, photos):
    root, _ = bad
    loaded = load_image(root / "png_named.jpg")
    with Image.open(photos[1]) as original:  # the PNG is a lossless copy of the second photo
        assert np.array_equal(np.asarray(loaded), np.asarray(original.convert("RGB")))


def test_sixteen_bit_png_is_scaled_not_clipped(bad):
    root, _ = bad
    loaded = pixels(load_image(root / "sixteen.png"))
    gradient = badfiles.sixteen_bit_gradient()
    expected = np.rint(gradient.astype(np.float64) * 255.0 / 65535.0)
    assert loaded.shape == gradient.shape + (3,)
    assert np.abs(loaded - expected[..., None]).max() <= 1
    assert loaded[0, 0].tolist() == [0, 0, 0]
    assert loaded[0, -1].tolist() == [255, 255, 255]
    middle = np.argmin(np.abs(gradient[0].astype(int) - 32768))
    assert abs(int(loaded[0, middle, 0]) - 128) <= 1
    assert (loaded == 255).mean() < 0.02  # clipping would make almost everything 255
    assert np.all(np.diff(loaded[0, :, 0]) >= 0)  # the gradient stays a gradient


def test_palette_transparency_composited_on_white(bad):
    root, _ = bad
    loaded = np.asarray(load_image(root / "palette_alpha.png"))
    size = loaded.shape[0]
    centre = loaded[size // 2 - 2 : size // 2 + 2, size // 2 - 2 : size // 2 + 2]
    assert np.all(centre == 255), "transparent pixels must become white, not the palette's black"
    assert loaded[1, 1].tolist() == list(badfiles.PALETTE[0])
    assert loaded[1, size - 2].tolist() == list(badfiles.PALETTE[1])


def test_animated_gif_gives_first_frame(bad):
    root, _ = bad
    loaded = np.asarray(load_image(root / "animated.gif"))
    assert loaded.shape == (40, 48, 3)
    assert np.all(loaded == np.array(badfiles.GIF_COLOURS[0]))


def test_exif_rotation_equals_rotation_by_hand(bad, photos):
    root, _ = bad
    path = root / "rotated.jpg"
    loaded = load_image(path)
    with Image.open(path) as raw:
        stored = raw.convert("RGB")  # the same decoded pixels, not rotated
        by_pillow = ImageOps.exif_transpose(raw).convert("RGB")
    assert loaded.size == (stored.height, stored.width)
    by_hand = stored.transpose(Image.Transpose.ROTATE_270)  # orientation 6: 90 degrees clockwise
    assert np.array_equal(np.asarray(loaded), np.asarray(by_hand))
    assert np.array_equal(np.asarray(loaded), np.asarray(by_pillow))
    with Image.open(photos[0]) as original:  # and the rotation is of the right photo, right way
        turned = original.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.abs(pixels(loaded) - pixels(turned)).mean() < 4.0


def test_exif_rotation_reports_stored_size(bad):
    root, _ = bad
    image, stored = decode_image_bytes((root / "rotated.jpg").read_bytes(), "r.jpg", with_size=True)
    assert stored == (image.height, image.width)


def test_cmyk_jpeg_has_plausible_colours(bad, photos):
    root, _ = bad
    loaded = load_image(root / "cmyk.jpg")
    with Image.open(root / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    with Image.open(photos[2]) as original:
        reference = original.convert("RGB")
    assert loaded.mode == "RGB" and loaded.size == reference.size
    diff = np.abs(pixels(loaded) - pixels(reference))
    assert diff.mean() < 4.0, f"mean abs diff {diff.mean():.1f}"
    inverted = np.abs(pixels(loaded) - (255 - pixels(reference)))
    assert inverted.mean() > 40  # an inverted-CMYK mistake would match this instead


def test_tiny_image_loads(bad):
    """Too small is the audit's call (min_side), not the loader's."""
    root, _ = bad
    assert load_image(root / "tiny.png").size == (8, 8)


# ---------------------------------------------------------------- draft mode


@pytest.mark.parametrize("draft", [16, 32, 100])
def test_draft_keeps_at_least_twice_the_size(photos, draft):
    full = load_image(photos[0])
    small = load_image(photos[0], draft_size=draft)
    assert min(small.size) >= 2 * draft
    assert small.size[0] <= full.size[0] and small.size[1] <= full.size[1]
    ratio = full.size[0] / full.size[1]
    assert abs(small.size[0] / small.size[1] - ratio) < 0.05


def test_draft_actually_reduces_jpeg_and_leaves_png(photos, bad):
    root, _ = bad
    full = load_image(photos[0])
    assert min(load_image(photos[0], draft_size=32).size) < min(full.size)
    png = load_image(root / "png_named.jpg")
    assert load_image(root / "png_named.jpg", draft_size=32).size == png.size


def test_draft_on_rotated_jpeg(bad):
    root, _ = bad
    full = load_image(root / "rotated.jpg")
    small = load_image(root / "rotated.jpg", draft_size=32)
    assert min(small.size) >= 64
    assert (small.width < small.height) == (full.width < full.height)


def test_draft_is_deterministic(photos):
    a = load_image(photos[1], draft_size=32)
    b = load_image(photos[1], draft_size=32)
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- to_rgb, mode by mode


def _values(image: Image.Image) -> list[list[int]]:
    return np.asarray(to_rgb(image)).reshape(-1, 3).tolist()


def _palette(mode: str, indices: list, colours: list[tuple[int, int, int]]) -> Image.Image:
    image = Image.new(mode, (len(indices), 1))
    image.putpalette([c for colour in colours for c in colour])
    for x, value in enumerate(indices):
        image.putpixel((x, 0), value)
    return image


def test_to_rgb_p_without_transparency():
    image = _palette("P", [0, 1], [(10, 20, 30), (200, 100, 50)])
    assert _values(image) == [[10, 20, 30], [200, 100, 50]]


def test_to_rgb_p_with_transparency():
    image = _palette("P", [0, 1], [(10, 20, 30), (0, 0, 0)])
    image.info["transparency"] = 1
    assert _values(image) == [[10, 20, 30], [255, 255, 255]]


def test_to_rgb_p_with_per_index_alpha_bytes():
    image = _palette("P", [0, 1, 2], [(10, 20, 30), (0, 0, 0), (200, 0, 0)])
    image.info["transparency"] = bytes([255, 0, 128])
    values = _values(image)
    assert values[0] == [10, 20, 30] and values[1] == [255, 255, 255]
    assert abs(values[2][0] - 228) <= 1 and abs(values[2][1] - 127) <= 1


def test_to_rgb_pa():
    image = _palette("PA", [(0, 255), (1, 0), (1, 255)], [(10, 20, 30), (200, 100, 50)])
    assert _values(image) == [[10, 20, 30], [255, 255, 255], [200, 100, 50]]


def test_to_rgb_rgba():
    array = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 0, 0, 128]]], np.uint8)
    values = _values(Image.fromarray(array, "RGBA"))
    assert values[0] == [10, 20, 30] and values[1] == [255, 255, 255]
    assert abs(values[2][0] - 228) <= 1 and abs(values[2][1] - 127) <= 1  # half over white


def test_to_rgb_la():
    array = np.array([[[50, 255], [50, 0], [0, 128]]], np.uint8)
    values = _values(Image.fromarray(array, "LA"))
    assert values[0] == [50, 50, 50] and values[1] == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in values[2])


def test_to_rgb_cmyk():
    for cmyk, rgb in [
        ((0, 255, 255, 0), [255, 0, 0]),
        ((0, 0, 0, 255), [0, 0, 0]),
        ((0, 0, 0, 0), [255, 255, 255]),
        ((255, 0, 255, 0), [0, 255, 0]),
    ]:
        assert _values(Image.new("CMYK", (1, 1), cmyk)) == [rgb]


def test_to_rgb_sixteen_bit():
    for mode in ("I;16", "I;16B"):
        data = np.array([0, 257, 32768, 65535], ">u2" if mode.endswith("B") else "<u2").tobytes()
        image = Image.frombytes(mode, (4, 1), data)
        assert [v[0] for v in _values(image)] == [0, 1, 128, 255], mode


def test_to_rgb_mode_i_sixteen_bit_values():
    image = Image.fromarray(np.array([[0, 32768, 65535, 1000]], np.int32), "I")
    assert [v[0] for v in _values(image)] == [0, 128, 255, 4]


def test_to_rgb_mode_i_eight_bit_values_kept():
    image = Image.fromarray(np.array([[0, 128, 255]], np.int32), "I")
    assert [v[0] for v in _values(image)] == [0, 128, 255]


def test_to_rgb_mode_i_out_of_range_stretched():
    image = Image.fromarray(np.array([[-100, 0, 100]], np.int32), "I")
    low, middle, high = (v[0] for v in _values(image))
    assert (low, high) == (0, 255) and abs(middle - 127.5) <= 1


def test_to_rgb_float_unit_range_scaled():
    image = Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], np.float32), "F")
    assert [v[0] for v in _values(image)] == [0, 64, 128, 255]


def test_to_rgb_float_other_range_stretched():
    image = Image.fromarray(np.array([[10.0, 137.5, 265.0]], np.float32), "F")
    assert [v[0] for v in _values(image)] == [0, 128, 255]


def test_to_rgb_float_nan_does_not_crash():
    image = Image.fromarray(np.array([[np.nan, 0.0, 1.0]], np.float32), "F")
    values = [v[0] for v in _values(image)]
    assert values[1:] == [0, 255]


def test_to_rgb_bilevel_and_grey():
    assert _values(Image.fromarray(np.array([[False, True]]))) == [[0, 0, 0], [255, 255, 255]]
    assert _values(Image.fromarray(np.array([[0, 7, 255]], np.uint8), "L")) == [[0] * 3, [7] * 3, [255] * 3]


def test_to_rgb_rgb_is_untouched():
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(image) is image


@pytest.mark.parametrize(
    "fmt, mode, array",
    [
        ("TIFF", "I;16", np.array([[0, 32768, 65535]], np.uint16)),
        ("TIFF", "F", np.array([[0.0, 0.5, 1.0]], np.float32)),
        ("PNG", "LA", np.array([[[0, 255], [0, 0], [255, 255]]], np.uint8)),
        ("WEBP", "RGBA", None),
    ],
)
def test_wide_and_alpha_files_round_trip(tmp_path, fmt, mode, array):
    """The same conversions hold for files, not only for in-memory images."""
    path = tmp_path / f"x.{fmt.lower()}"
    if array is None:
        rgba = np.zeros((8, 8, 4), np.uint8)
        rgba[..., 0] = 200
        rgba[:, :4, 3] = 255  # left opaque red, right transparent
        Image.fromarray(rgba, "RGBA").save(path, fmt, lossless=True)
        loaded = np.asarray(load_image(path))
        assert loaded[0, 0].tolist() == [200, 0, 0] and loaded[0, 7].tolist() == [255, 255, 255]
        return
    image = Image.fromarray(array) if mode in ("I;16", "F") else Image.fromarray(array, mode)
    assert image.mode == mode
    image.save(path, fmt)
    loaded = np.asarray(load_image(path)).reshape(-1, 3)
    if mode == "LA":
        assert loaded.tolist() == [[0, 0, 0], [255, 255, 255], [255, 255, 255]]
    else:
        assert loaded[:, 0].tolist() == [0, 128, 255]


# ---------------------------------------------------------------- never anything but ImageError

_MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xdb",
    b"GIF89a",
    b"GIF87a",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"RIFF\x20\x00\x00\x00WEBPVP8 ",
]


def _encoded_samples() -> list[bytes]:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = []
    for fmt, options in [
        ("PNG", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("GIF", {}),
        ("TIFF", {}),
        ("BMP", {}),
        ("WEBP", {}),
        ("JPEG", {"exif": exif.tobytes()}),
    ]:
        buffer = io.BytesIO()
        base.save(buffer, fmt, **options)
        out.append(buffer.getvalue())
    return out


def _assert_only_image_error(data: bytes, draft_size: int | None) -> None:
    try:
        image = decode_image_bytes(data, "fuzz", draft_size=draft_size)
    except ImageError as exc:
        assert exc.reason and exc.path == "fuzz"
    else:
        assert image.mode == "RGB"


@pytest.mark.filterwarnings("ignore")
def test_fuzz_random_bytes_only_raise_image_error():
    rng = random.Random(20240601)
    for case in range(200):
        body = rng.randbytes(rng.randrange(0, 400))
        data = body if case % 3 == 0 else rng.choice(_MAGICS) + body
        _assert_only_image_error(data, rng.choice([None, 32]))


@pytest.mark.filterwarnings("ignore")
def test_fuzz_mutated_real_files_only_raise_image_error():
    rng = random.Random(7)
    samples = _encoded_samples()
    for _ in range(200):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        _assert_only_image_error(bytes(data), rng.choice([None, 32]))


# EXIF with orientation 6 and a YPosition tag (a RATIONAL tag) stored as ASCII "cam": found by
# fuzzing. Decoding is fine; ImageOps.exif_transpose then re-serialises the EXIF and raises TypeError.
_BAD_EXIF = (
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02"
    b"\x01\x1f\x00\x02\x00\x00\x00\x04cam\x00"
    b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
    b"\x00\x00\x00\x00"
)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_malformed_exif_gives_image_error(tmp_path, fmt):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (40, 30), (90, 90, 90)).save(path, fmt, exif=_BAD_EXIF)
    try:
        image = load_image(path)
    except ImageError:
        return  # refusing it is fine too
    assert image.size in ((30, 40), (40, 30))


def test_tiff_with_wrong_tag_type_gives_image_error(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 24), (1, 2, 3)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    entry = data.find(b"\x11\x01\x04\x00\x01\x00\x00\x00")  # StripOffsets, LONG, count 1 (little-endian)
    assert entry > 0
    data[entry + 2] = 5  # type RATIONAL
    path = tmp_path / "x.tif"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError):
        load_image(path)


# ---------------------------------------------------------------- odds and ends


def test_idx_image_loads_as_rgb(tmp_path):
    from imgclf.data.sources import open_sample, scan
    from imgclf.data.sources.idx import write_idx

    arrays = (np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28) * 7).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", arrays)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1], dtype=np.uint8))
    samples = scan(tmp_path).samples
    image = open_sample(samples[1])
    assert image.mode == "RGB" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[..., 1], arrays[1])


def test_is_image_name():
    assert is_image_name("a/B.JPG") and is_image_name("x.tiff") and is_image_name("y.webp")
    assert not is_image_name("notes.txt") and not is_image_name("scan.pdf")
    assert is_image_name("IMG_1.HEIC"), "listed, so that each is read (pillow-heif) or reported, never skipped unseen"


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_bombs_over_and_far_over_pillows_limit_are_refused_with_flat_memory(tmp_path, side):
    """BAD_INPUTS case 5: 10000x10000 (over Pillow's limit: its warning is an error here) and
    20000x20000 (far over: Pillow's own error), each a solid PNG under 1 MB; refused from the
    header, with no more than a few MB allocated (decoding would take 300 MB or 1.2 GB)."""
    import tracemalloc
    import zlib

    # a valid PNG written row by row, so the test itself never holds the pixels
    rows = zlib.compressobj(9)
    body = b"".join(rows.compress(b"\x00" + bytes(side)) for _ in range(side)) + rows.flush()
    assert len(body) < 1_000_000

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="too many pixels"):
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"{peak / 2**20:.0f} MB allocated to refuse it"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_a_thousand_frame_animation_gives_its_first_frame_in_bounded_time(tmp_path, fmt):
    """BAD_INPUTS case 8: 1,000 frames, the first one only, well under a second."""
    frames = [Image.new("RGB", (256, 256), (250 - i % 200, i // 4, 40)) for i in range(1000)]  # all differ
    path = tmp_path / f"anim.{fmt.lower()}"
    extra = {"lossless": True} if fmt == "WEBP" else {}  # lossy WebP merges frames that look alike
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=40, loop=0, **extra)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 1000
    started = time.perf_counter()
    image = load_image(path)
    assert time.perf_counter() - started < 1.0
    assert np.abs(np.asarray(image)[5, 5].astype(int) - (250, 0, 40)).max() < 12


def test_very_long_and_unicode_names_load(tmp_path, photos):
    """BAD_INPUTS case 16: a 250-byte name (near the 255-byte limit) in Japanese, with spaces."""
    import shutil

    name = ""
    while len((name + "写真 ").encode()) <= 251:
        name += "写真 "
    name += ".jpg"
    assert 240 < len(name.encode()) <= 255
    shutil.copy(photos[0], tmp_path / name)
    assert load_image(tmp_path / name).mode == "RGB"


@pytest.mark.filterwarnings("ignore")
def test_fuzz_larger_files_are_bounded_in_time_and_leak_no_file_handle(tmp_path, clothing):
    """BAD_INPUTS case 12 with real photos of some size: 300 mutations of clothing photos (byte
    flips, cuts, repeated chunks, up to a few hundred kB) read from files through load_image:
    only ImageError, each in well under two seconds, and no file descriptor left open."""
    import os

    rng = random.Random(12)
    photos = [p.read_bytes() for p in sorted((clothing / "train" / "shoes").glob("*.jpg"))[:6]]
    photos += [p.read_bytes() for p in sorted((clothing / "train" / "hat").glob("*.jpg"))[:6]]
    open_before = len(os.listdir("/proc/self/fd"))
    slowest = 0.0
    for case in range(300):
        data = bytearray(rng.choice(photos))
        for _ in range(rng.randrange(1, 40)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if case % 4 == 1:
            data = data[: rng.randrange(1, len(data))]
        elif case % 4 == 2:
            start = rng.randrange(len(data))
            data = data[:start] + data[start : start + 4096] * rng.randrange(2, 40) + data[start:]
        path = tmp_path / f"{case}.jpg"
        path.write_bytes(bytes(data))
        started = time.perf_counter()
        try:
            assert load_image(path, draft_size=rng.choice([None, 64])).mode == "RGB"
        except ImageError as exc:
            assert exc.reason and exc.path == str(path)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 2.0, f"one mutated photo took {slowest:.2f} s"
    assert len(os.listdir("/proc/self/fd")) <= open_before, "a file handle was left open"


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(tmp_path):
    """BAD_INPUTS case 50: a progressive JPEG whose last scan is repeated 2,000 times (each scan
    passes over the whole image again) is refused from a count of its scan markers, at once; an
    ordinary progressive JPEG still decodes."""
    rng = np.random.default_rng(3)
    path = tmp_path / "progressive.jpg"
    Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(path, "JPEG", progressive=True)
    data = path.read_bytes()
    assert load_image(path).size == (800, 600) and 2 < data.count(b"\xff\xda") < 20
    last = data.rindex(b"\xff\xda")
    slow = tmp_path / "slow.jpg"
    slow.write_bytes(data[:last] + data[last:-2] * 2000 + b"\xff\xd9")
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"too many JPEG scans \(20\d\d, over 500\): decoding could take minutes"):
        load_image(slow)
    assert time.perf_counter() - started < 1.0


def _many_scan_jpeg(tmp_path, height: int, width: int, scans: int, seed: int = 3) -> Path:
    """A progressive JPEG of random pixels whose last scan is repeated (each copy is decoded again)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    path = tmp_path / f"scans-{scans}.jpg"
    path.write_bytes(data[:last] + data[last:-2] * (scans - data.count(b"\xff\xda") + 1) + b"\xff\xd9")
    return path


def test_a_decode_past_the_time_limit_is_stopped_and_named(tmp_path, monkeypatch):
    """BAD_INPUTS case 50 with a timer: 100 full scans of a 4-megapixel photo take about 2 s to
    decode here; with the limit at 0.5 s the decoding process is killed at 0.5 s and the file
    named with the reason."""
    import imgclf.data.images as images

    slow = _many_scan_jpeg(tmp_path, 2000, 2000, 100)
    monkeypatch.setattr(images, "DECODE_LIMIT_S", 0.5)
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"scans-100\.jpg: decoding took over 0\.5 s: stopped"):
        load_image(slow)
    assert time.perf_counter() - started < 1.5


def test_a_tiff_or_a_many_scan_jpeg_decoded_in_a_child_is_the_same_image(tmp_path):
    """Those decodes run in a child process (killed past the limit): the pixels, the EXIF
    rotation, the reason of a damaged file are what the decode in this process gives."""
    import imgclf.data.images as images

    rng = np.random.default_rng(5)
    tiff = tmp_path / "photo.tif"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: stored 60x40, seen 40x60
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tiff, "TIFF", exif=exif)
    jpeg = _many_scan_jpeg(tmp_path, 48, 64, 30)
    for path in (tiff, jpeg):
        guarded = load_image(path)
        direct = images._decoded(Image.open(path), str(path), None)
        assert guarded.size == direct.size and np.array_equal(np.asarray(guarded), np.asarray(direct))
    assert load_image(tiff).size == (40, 60)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(tiff.read_bytes()[: tiff.stat().st_size // 2])
    with pytest.raises(ImageError) as raised:
        load_image(cut)
    reason = raised.value.reason
    assert raised.value.path == str(cut) and ("truncated" in reason or "cannot decode" in reason), reason
