"""The one image loader, shared by audit, training, evaluation and prediction.

Formats are sniffed from the content (never trusted from the extension) against an
allowlist; EXIF orientation is applied; every Pillow mode becomes 8-bit RGB with correct
values (16-bit and float scaled, transparency composited on a fixed background).
"""

from __future__ import annotations

import io
import os
import select
import signal
import stat
import struct
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgclf.core.errors import ImageError

__all__ = ["ImageError", "load_image", "decode_image_bytes", "read_file", "to_rgb", "is_image_name"]

# Formats we decode. Everything else (PDF, EPS, FITS, ...) is refused before any decoder runs.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# HEIC/HEIF (iPhone photos) are read when the pillow-heif plugin is installed (imgclf[heic]);
# without it they are still listed by folder scans, so that each is reported, not skipped unseen
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif"}
try:
    import pillow_heif

    pillow_heif.register_heif_opener()
    ALLOWED_FORMATS += ("HEIF",)
except ImportError:
    pass
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own limit; more is treated as a decompression bomb
# No photo is this large (an uncompressed BMP at the pixel limit is 270 MB): a bigger file named
# .jpg is never read whole
MAX_FILE_BYTES = 512 * 2**20
# A progressive JPEG has about ten scans; libjpeg-turbo's own guard (tjLimitScans) stops at 500.
# (0xFF 0xDA marks a scan: inside compressed data a 0xFF is always followed by 0x00 or a restart.)
MAX_JPEG_SCANS = 500
# A TIFF, or a JPEG of more scans than this (an ordinary progressive one has about ten), is
# decoded in a child process stopped after DECODE_LIMIT_S (BAD_INPUTS case 50). Nothing under
# the caps was measured near it: an 84-megapixel TIFF 0.7 s, a 272 MB progressive JPEG 7.8 s.
GUARDED_JPEG_SCANS = 20
DECODE_LIMIT_S = 30.0
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, always the same

# Never accept truncated images silently (Pillow's global switch must stay off).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Formats we do not read (Pillow reads several of them: PPM, ICO, TGA, PSD...), named by their
# first bytes or, for those without a signature, their extension; never opened to find out
_KNOWN_OTHER_FORMATS = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "PostScript/EPS"),
    (b"SIMPLE  =", "FITS"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"\x01\xda", "SGI"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
    (b"gimp xcf", "XCF"),
    (b"#define", "XBM"),
    (b"/* XPM */", "XPM"),
)
_OTHER_SUFFIXES = {
    ".tga": "TGA", ".pcx": "PCX", ".ppm": "PPM", ".pgm": "PGM", ".pbm": "PBM", ".pnm": "PNM", ".ico": "ICO",
    ".svg": "SVG", ".gd": "GD", ".area": "McIdas", ".dib": "DIB", ".jxl": "JPEG XL",
}  # fmt: skip


def _sniff_unsupported(data: bytes, name: str = "") -> str:
    """Name a format we do not read, from its first or last bytes or its name, for a helpful reason."""
    head = data[:16]
    if data[-18:-2] == b"TRUEVISION-XFILE":  # a TGA's footer (TGA has no signature at the start)
        return "unsupported format (TGA)"
    for magic, label in _KNOWN_OTHER_FORMATS:
        if head.startswith(magic):
            return f"unsupported format ({label})"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n":
        return "unsupported format (PPM/PGM/PBM)"
    if len(head) > 2 and head[0] == 0x0A and head[1] in (0, 2, 3, 4, 5) and head[2] == 1:
        return "unsupported format (PCX)"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"heim", b"heis"):
            if "HEIF" in ALLOWED_FORMATS:
                return "not a valid image (a HEIC file that pillow-heif cannot read)"
            return "unsupported format (HEIC; install the pillow-heif plugin to read it: pip install 'imgclf[heic]')"
        if brand in (b"avif", b"avis"):
            return "unsupported format (AVIF; install the pillow-avif-plugin to read it)"
    stripped = head.lstrip()
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and name.lower().endswith(".svg")):
        return "unsupported format (SVG)"
    suffix = os.path.splitext(name)[1].lower()
    if suffix in _OTHER_SUFFIXES:
        return f"unsupported format ({_OTHER_SUFFIXES[suffix]})"
    return "not an image"


def _scale_to_uint8(array: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Scale integer or float pixel values to 0..255 without clipping the range away."""
    array = array.astype(np.float64)
    if full_scale is None:  # unknown range: stretch what is there
        low, high = float(array.min()), float(array.max())
        full_scale = high - low if high > low else 1.0
        array = array - low
    return np.clip(np.rint(array * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _wide_to_l(image: Image.Image) -> Image.Image:
    """Convert 16-bit, 32-bit integer and float single-channel images to 8-bit L."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(array, 65535.0), "L")
    if image.mode == "I":
        # Pillow opens 16-bit PNG/TIFF greyscale as "I": values up to 65535 are 16-bit data.
        if array.min() >= 0 and array.max() <= 65535:
            full = 255.0 if array.max() <= 255 else 65535.0
            return Image.fromarray(_scale_to_uint8(array, full), "L")
        return Image.fromarray(_scale_to_uint8(array, None), "L")
    # "F": floats in [0, 1] are intensities; anything else is stretched to its range
    if array.size and array.min() >= 0.0 and array.max() <= 1.0:
        return Image.fromarray(_scale_to_uint8(array, 1.0), "L")
    return Image.fromarray(_scale_to_uint8(np.nan_to_num(array), None), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB with correct values."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _wide_to_l(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open_checked(data: io.BytesIO | str, path: str, max_pixels: int) -> Image.Image:
    """Open with the format allowlist and refuse bombs before decoding any pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(data, formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(path, "too many pixels (decompression bomb)") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(path, f"too many pixels ({width}x{height}, decompression bomb)")
    return image


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of an image file, or :class:`ImageError` naming why it cannot be read. Only
    regular files are read (opened without blocking, so a FIFO named .jpg cannot hang a run),
    and none larger than ``max_bytes``."""
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise ImageError(name, "is a directory") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(name, "is a directory")
        device = stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if device else "a socket"
        raise ImageError(name, f"not a regular file ({kind})")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > max_bytes:
            raise ImageError(name, f"too large ({info.st_size // 2**20} MB; no photo is over {max_bytes // 2**20} MB)")
        try:
            return handle.read()  # sized from the file (read(n) would allocate n bytes up front)
        except OSError as exc:
            raise ImageError(name, f"cannot read file ({exc.strerror or exc})") from None


def load_image(
    path: str | os.PathLike,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode one image file to an RGB Pillow image, or raise :class:`ImageError` naming the reason.

    ``draft_size``: when the caller will shrink the image to about this many pixels on the short
    side, JPEGs are decoded at a reduced scale (Pillow's draft mode), still at least twice that
    size so the final resize keeps its quality. Use the same value everywhere for one model so the
    same photo always gives the same pixels.
    """
    return decode_image_bytes(read_file(path), str(path), draft_size=draft_size, max_pixels=max_pixels)


def decode_image_bytes(
    data: bytes,
    name: str,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    with_size: bool = False,
):
    """Decode image bytes (a file's content or an upload) exactly as :func:`load_image` does.

    With ``with_size``, return ``(image, (width, height))`` where the size is the stored one,
    before draft-mode reduction and EXIF rotation.
    """
    if len(data) == 0:
        raise ImageError(name, "empty file")
    scans = data.count(b"\xff\xda") if data[:2] == b"\xff\xd8" else 0
    if scans > MAX_JPEG_SCANS:
        # each progressive scan passes over the whole image again: thousands take minutes to decode
        raise ImageError(name, f"too many JPEG scans ({scans}, over {MAX_JPEG_SCANS}): decoding could take minutes")
    try:
        image = _open_checked(io.BytesIO(data), name, max_pixels)
    except UnidentifiedImageError:
        raise ImageError(name, _sniff_unsupported(data, name)) from None
    except ImageError:
        raise
    except Exception as exc:  # Pillow's parsers raise many types (TypeError, IndexError...) on bad files
        raise ImageError(name, f"not a valid image ({type(exc).__name__}: {exc})") from None
    stored_size = image.size  # read before draft() shrinks it
    if image.format == "TIFF" or scans > GUARDED_JPEG_SCANS:
        image = _decoded_in_child(image, name, draft_size)
    else:
        image = _decoded(image, name, draft_size)
    return (image, stored_size) if with_size else image


def _decoded(image: Image.Image, name: str, draft_size: int | None) -> Image.Image:
    """The opened image's first frame, decoded, upright, RGB; ImageError naming why not."""
    try:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size * 2, draft_size * 2))
        image.seek(0)  # animated GIF/WebP/TIFF: the first frame only
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: a copy of every photo cost 0.35 ms
        return to_rgb(image)
    except ImageError:
        raise
    except OSError as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else f"cannot decode ({text})"
        raise ImageError(name, reason) from None
    except Exception as exc:  # e.g. TypeError from a damaged EXIF or TIFF tag: still just a bad file
        raise ImageError(name, f"cannot decode ({type(exc).__name__}: {exc})") from None


def _decoded_in_child(image: Image.Image, name: str, draft_size: int | None) -> Image.Image:
    """:func:`_decoded` in a forked child, killed after ``DECODE_LIMIT_S``: Pillow's decoders
    cannot be interrupted in a thread. Only for files that may be slow by construction (TIFF, a
    JPEG of many scans), as a fork costs milliseconds an ordinary photo should not pay."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: decode, send the pixels or the reason, and leave without clean-up
        try:
            os.close(read_end)
            try:
                rgb = _decoded(image, name, draft_size)
                payload = b"I" + struct.pack("<II", *rgb.size) + rgb.tobytes()
            except ImageError as exc:
                payload = b"E" + exc.reason.encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + DECODE_LIMIT_S
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := _read_before(pipe, deadline):
            chunks.append(chunk)
        if chunk is None:
            os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if chunk is None:
        raise ImageError(name, f"decoding took over {DECODE_LIMIT_S:g} s: stopped (a file made to be slow to decode?)")
    answer = b"".join(chunks)
    if answer[:1] == b"I":
        width, height = struct.unpack("<II", answer[1:9])
        return Image.frombytes("RGB", (width, height), answer[9:])
    reason = answer[1:].decode(errors="replace") if answer[:1] == b"E" else "cannot decode (the decoder crashed)"
    raise ImageError(name, reason)


def _read_before(pipe, deadline: float) -> bytes | None:
    """The next bytes from ``pipe`` (b"" at its end), or None when the deadline passes first."""
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([pipe], [], [], left)[0]:
        return None
    return pipe.read(1 << 20)


def is_image_name(path: str | Path) -> bool:
    """Whether a file name looks like an image; only used to choose files while scanning folders."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
