"""Generators of bad and unusual image files, and of small class folders of real photos, for tests.

``make_bad_folder(root, photos)`` writes one file per case into a class folder and returns
``{file name: expected reason substring, or "ok"}``. Everything is generated from a few real
clothing photos (read in place from ``../shared/datasets/clothing-small``, never copied into the repo)
and takes well under a second.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ../shared/datasets/clothing-small seen from the project root (see its README.md)
CLOTHING = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "clothing-small"

OK = "ok"
TOO_SMALL = "too small"  # not a loader error: only the audit rejects it (min_side)
BOMB_SIDE = 20_000  # 400 M pixels: more than twice Pillow's limit, so refused at open

# Bad and unusual files: name -> expected ImageError reason substring, "ok", or TOO_SMALL.
EXPECTED = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated",
    "notes.jpg": "not an image",
    "png_named.jpg": OK,
    "cmyk.jpg": OK,
    "sixteen.png": OK,
    "palette_alpha.png": OK,
    "animated.gif": OK,
    "rotated.jpg": OK,
    "bomb.png": "too many pixels",
    "tiny.png": TOO_SMALL,
}
ERRORS = {name: reason for name, reason in EXPECTED.items() if reason not in (OK, TOO_SMALL)}
VALID = sorted(name for name, reason in EXPECTED.items() if reason == OK)

# Solid colours of the frames of animated.gif, and the palette of palette_alpha.png.
GIF_COLOURS = ((220, 30, 40), (30, 200, 60), (40, 50, 210))
PALETTE = ((200, 40, 40), (20, 120, 220), (0, 0, 0))  # index 2 is the transparent one
TRANSPARENT_INDEX = 2


def missing_data(message: str):
    """Skip a test whose real photos are not here; fail it loudly where they must be (CI sets
    IMGCLF_REQUIRE_DATA=1), so that a CI without ../shared/datasets is red, not quietly short."""
    if os.environ.get("IMGCLF_REQUIRE_DATA"):
        pytest.fail(f"{message}; IMGCLF_REQUIRE_DATA is set, so this is a failure, not a skip")
    pytest.skip(message)


def clothing_photos(
    classes: Sequence[str] = ("hat", "shoes", "skirt"), per_class: int = 12, split: str = "train"
) -> dict[str, list[Path]]:
    """The first ``per_class`` photos (sorted by name: always the same) of each class; skip if absent."""
    if not CLOTHING.is_dir():
        missing_data(f"real photos not found at {CLOTHING} (see ../shared/datasets/README.md)")
    chosen = {}
    for name in classes:
        files = sorted((CLOTHING / split / name).glob("*.jpg"))[:per_class]
        if len(files) < per_class:
            missing_data(f"{CLOTHING / split / name}: {len(files)} photos, {per_class} needed")
        chosen[name] = files
    return chosen


def some_photos(n: int = 3) -> list[Path]:
    """A few real clothing photos from different classes."""
    per_class = clothing_photos(("dress", "hat", "shoes", "pants"), per_class=max(1, (n + 3) // 4))
    mixed = [photo for group in zip(*per_class.values()) for photo in group]
    return mixed[:n]


def make_photo_folder(
    root: Path, photos: Mapping[str, Sequence[Path]] | Sequence[Path], classes: Sequence[str] = ("hat", "shoes")
) -> dict[str, list[Path]]:
    """Copy photos into ``root/<class>/``: from a ``{class: photos}`` mapping, or a list dealt
    in equal consecutive chunks over ``classes``. Returns ``{class: copied paths}``."""
    if not isinstance(photos, Mapping):
        photos = list(photos)
        size = -(-len(photos) // len(classes))
        photos = {name: photos[i * size : (i + 1) * size] for i, name in enumerate(classes)}
    copied: dict[str, list[Path]] = {}
    for name, files in photos.items():
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        copied[name] = []
        for source in files:
            target = folder / Path(source).name
            shutil.copyfile(source, target)
            copied[name].append(target)
    return copied


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid ``side`` x ``side`` 1-bit black PNG, about 50 kB, written row by row.

    (Image.new("1", ...) would hold one byte per pixel in memory: 400 MB for 20000x20000.)
    """
    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + packed bits, all black
    compressor = zlib.compressobj(9)
    block = row * 64
    parts = [compressor.compress(block) for _ in range(side // 64)]
    parts += [compressor.compress(row * (side % 64)), compressor.flush()]
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def sixteen_bit_gradient(width: int = 256, height: int = 40) -> np.ndarray:
    """uint16 (height, width) with columns going 0 .. 65535 (column 0 is 0, the last 65535)."""
    row = np.rint(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.repeat(row[None, :], height, axis=0)


def palette_alpha_image(size: int = 40) -> Image.Image:
    """P image: left half index 0, right half index 1, a centre square of the transparent index."""
    indices = np.zeros((size, size), np.uint8)
    indices[:, size // 2 :] = 1
    quarter = size // 4
    indices[quarter : size - quarter, quarter : size - quarter] = TRANSPARENT_INDEX
    image = Image.frombytes("P", (size, size), indices.tobytes())
    image.putpalette([c for colour in PALETTE for c in colour])
    return image


def rotated_jpeg(photo: Path) -> bytes:
    """The photo re-saved with EXIF orientation 6 (viewers rotate it 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    with Image.open(photo) as image:
        image.convert("RGB").save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def cmyk_jpeg(photo: Path) -> bytes:
    out = io.BytesIO()
    with Image.open(photo) as image:
        image.convert("RGB").convert("CMYK").save(out, "JPEG", quality=95)
    return out.getvalue()


def make_bad_folder(root: Path, photos: list[Path]) -> dict[str, str]:
    """Write the bad and unusual files of :data:`EXPECTED` into ``root``; return a copy of it.

    ``photos``: real JPEG photos (at least one; up to three are used, so the files derived from
    photos are not byte-identical to each other).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    photos = [Path(p) for p in photos]
    if not photos:
        raise ValueError("make_bad_folder needs at least one real photo")
    first, second, third = (photos * 3)[:3]

    (root / "empty.jpg").write_bytes(b"")

    data = first.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])

    (root / "notes.jpg").write_text(
        "<!DOCTYPE html>\n<html><head><title>Not found</title></head>\n"
        "<body><p>The photo you asked for was moved.</p></body></html>\n",
        encoding="utf-8",
    )

    with Image.open(second) as image:
        image.convert("RGB").save(root / "png_named.jpg", "PNG")

    (root / "cmyk.jpg").write_bytes(cmyk_jpeg(third))

    Image.fromarray(sixteen_bit_gradient()).save(root / "sixteen.png")  # mode I;16

    palette_alpha_image().save(root / "palette_alpha.png", transparency=TRANSPARENT_INDEX)

    frames = [Image.new("RGB", (48, 40), colour) for colour in GIF_COLOURS]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    (root / "rotated.jpg").write_bytes(rotated_jpeg(first))

    (root / "bomb.png").write_bytes(bomb_png())

    Image.new("RGB", (8, 8), (120, 60, 30)).save(root / "tiny.png")

    return dict(EXPECTED)
