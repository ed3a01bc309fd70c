"""What arrived, checked: decoded with imgclf's one image loader (format by content, allowlist,
pixel cap before decoding), sized, and compared with known placeholder pictures by exact and
perceptual hash (imagehash's pHash, so a re-encoded or resized copy is caught too)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import imagehash
from PIL import Image

from imgclf.core.errors import DataError, ImageError
from imgclf.data.images import decode_image_bytes

PHASH_DISTANCE = 8  # of 64 bits: re-encoding and resizing stay within ~4, different photos are ~32 apart
FORMATS = {
    b"\xff\xd8\xff": "jpg",
    b"\x89PNG": "png",
    b"GIF8": "gif",
    b"BM": "bmp",
    b"II*\x00": "tif",
    b"MM\x00*": "tif",
}


class Rejected(Exception):
    def __init__(self, outcome: str, detail: str):
        super().__init__(detail)
        self.outcome, self.detail = outcome, detail


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 32
    min_bytes: int = 0
    max_aspect: float = 0.0  # 0: any
    max_pixels: int = 89_478_485
    max_side: int = 0  # 0: keep the size


@dataclass
class Checked:
    sha256: str
    phash: str
    width: int
    height: int
    format: str  # the file suffix, from the content
    data: bytes  # what to write (downscaled when max_side asks)


def format_of(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in FORMATS.items() if data.startswith(magic)), "bin")


def _reason_to_outcome(reason: str) -> str:
    if "too many pixels" in reason:
        return "too_many_pixels"
    if reason.startswith(("not an image", "unsupported format", "empty")):
        return "not_image"
    return "decode_error"


class Placeholders:
    """Known stand-in pictures: exact SHA-256 and pHash within :data:`PHASH_DISTANCE`."""

    def __init__(self, files: list[str | Path] = ()) -> None:
        self.exact: dict[str, str] = {}
        self.hashes: list[tuple[imagehash.ImageHash, str]] = []
        for path in files:
            try:
                data = Path(path).read_bytes()
                image = decode_image_bytes(data, str(path))
            except (OSError, ImageError) as exc:
                raise DataError(f"{path}: cannot be read as a placeholder picture ({exc})") from None
            self.exact[hashlib.sha256(data).hexdigest()] = Path(path).name
            self.hashes.append((imagehash.phash(image), Path(path).name))

    def match(self, phash: imagehash.ImageHash) -> str:
        """Which placeholder this looks like, or ""."""
        for known, name in self.hashes:
            distance = known - phash
            if distance <= PHASH_DISTANCE:
                return f"looks like {name} (pHash distance {distance})"
        return ""


def _downscale(image: Image.Image, fmt: str, max_side: int) -> bytes:
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, "PNG", optimize=False)
    else:
        image.save(out, "JPEG", quality=92)
    return out.getvalue()


def check_image(data: bytes, name: str, limits: ImageLimits, placeholders: Placeholders) -> Checked:
    """The checked picture, or :class:`Rejected` with the outcome and why."""
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 in placeholders.exact:
        raise Rejected("placeholder", f"the same bytes as {placeholders.exact[sha256]}")
    try:
        image, (width, height) = decode_image_bytes(data, name, max_pixels=limits.max_pixels, with_size=True)
    except ImageError as exc:
        raise Rejected(_reason_to_outcome(exc.reason), exc.reason) from None
    if min(width, height) < limits.min_side:
        raise Rejected("too_small", f"{width}x{height} is under min_side {limits.min_side}")
    if len(data) < limits.min_bytes:
        raise Rejected("too_small", f"{len(data)} bytes is under min_bytes {limits.min_bytes}")
    if limits.max_aspect and max(width, height) > limits.max_aspect * min(width, height):
        raise Rejected("bad_aspect", f"{width}x{height} is longer than max_aspect {limits.max_aspect:g} to 1")
    phash = imagehash.phash(image)
    same = placeholders.match(phash)
    if same:
        raise Rejected("placeholder", same)
    fmt = format_of(data)
    if limits.max_side and max(image.size) > limits.max_side:
        data = _downscale(image, fmt, limits.max_side)
        fmt = "png" if fmt == "png" else "jpg"
    return Checked(sha256, str(phash), width, height, fmt, data)
