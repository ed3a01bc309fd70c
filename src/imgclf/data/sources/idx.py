"""MNIST-format IDX files (as MNIST and Fashion-MNIST ship them) and their download.

A folder holding ``<prefix>-images-idx3-ubyte[.gz]`` with ``<prefix>-labels-idx1-ubyte[.gz]`` is a
data source; ``train`` prefixes are the training split and ``t10k``/``test`` prefixes the test split.
Class names come from ``classes.txt`` (one per line) when present, else from the known data sets.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.core.errors import DataError, ImageError
from imgclf.data.fetch.http import Failure, HttpLimits, download_file
from imgclf.data.sources.base import Reader, Sample, ScanResult, Source

DOWNLOAD_LIMITS = HttpLimits(read_timeout=60.0, url_timeout=900.0, max_bytes=200_000_000, user_agent="imgclf/0.1")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))

_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
DATASETS = {
    "fashion-mnist": {
        "base": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "classes": FASHION_MNIST_CLASSES,
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
    "mnist": {
        "base": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "classes": MNIST_CLASSES,
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
}

_IMAGES_RE = re.compile(r"^(?P<prefix>.+?)[-_.]images[-_.]idx3[-_.]ubyte(\.gz)?$")
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# The most an IDX file may hold once decompressed. The largest IDX data sets (EMNIST ByClass's
# training images, 0.55 GB) fit with room; a header declaring more is refused before any of the
# data is read, as a file that size would not fit in memory next to its decoded copies anyway.
MAX_IDX_BYTES = 2 << 30
_CHUNK = 1 << 20
# A data set's classes: more than any labelled data set has, few enough to name them all.
MAX_CLASSES = 1 << 16


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_upto(handle, limit: int) -> bytearray:
    """At most ``limit`` bytes, read (and decompressed) a chunk at a time: a gzip bomb is never
    inflated past what its header promised."""
    data = bytearray()
    while len(data) < limit:
        chunk = handle.read(min(_CHUNK, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def read_idx(path: str) -> np.ndarray:
    """Parse one IDX file (gzip or raw) into a read-only array, checking the header against the
    size. Cached per (path, size, mtime): a file replaced on disk is read again."""
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    return _read_idx_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    try:
        with _open(Path(path)) as handle:
            magic = _read_upto(handle, 4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES:
                raise DataError(f"{path}: not an IDX file (bad magic number)")
            dims = _read_upto(handle, 4 * magic[3])
            if len(dims) < 4 * magic[3]:
                raise DataError(f"{path}: IDX header is truncated")
            shape = struct.unpack(f">{magic[3]}I", dims)
            dtype = np.dtype(_DTYPES[magic[2]])
            expected = math.prod(shape) * dtype.itemsize  # Python ints: a forged header cannot overflow it
            if expected > MAX_IDX_BYTES:
                raise DataError(
                    f"{path}: IDX header says {shape} {dtype.name} values, {expected} bytes, over the "
                    f"{MAX_IDX_BYTES} imgclf reads; not read (a corrupt file or a gzip bomb)"
                )
            data = _read_upto(handle, expected + 1)  # one byte more tells a longer file from a right one
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) > expected:
        raise DataError(
            f"{path}: IDX data is more than {expected} bytes, header says {expected}; not read further "
            "(a corrupt file or a gzip bomb)"
        )
    if len(data) != expected:
        raise DataError(f"{path}: IDX data is {len(data)} bytes, header says {expected}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    array.flags.writeable = False  # shared by every caller through the cache
    return array


def find_idx_pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    """``{prefix: (images_file, labels_file)}`` for the IDX pairs in a folder."""
    if not root.is_dir():
        return {}
    pairs = {}
    for path in sorted(root.iterdir()):
        match = _IMAGES_RE.match(path.name)
        if not match:
            continue
        prefix = match.group("prefix")
        labels = [
            p
            for p in root.iterdir()
            if p.name.startswith(prefix) and re.search(r"labels[-_.]idx1[-_.]ubyte(\.gz)?$", p.name)
        ]
        if labels:
            pairs[prefix] = (path, labels[0])
    return pairs


def class_names(root: Path, n_classes: int, largest: str = "") -> list[str]:
    """The names of classes ``0..n_classes-1``; ``largest`` says where the largest label is, for the error."""
    names_file = root / "classes.txt"
    if names_file.exists():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) < n_classes:
            raise DataError(f"{names_file}: {len(names)} names for {n_classes} classes{largest}; add the missing names")
        return names
    if n_classes <= 10 and "fashion" in root.name.lower():
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(n_classes)]


def _split_of(prefix: str) -> str:
    return "test" if prefix.lower().startswith(("t10k", "test")) else "train"


def _check_pair(images: Path, labels: Path, image_array: np.ndarray, label_array: np.ndarray) -> None:
    """Refuse what would be read wrong: images other than 8-bit greyscale (their bytes would be
    decoded as 8-bit pixels), labels that are not whole numbers or not class indices."""
    if image_array.ndim != 3 or label_array.ndim != 1 or len(image_array) != len(label_array):
        raise DataError(f"{images}: {image_array.shape} images do not match {label_array.shape} labels")
    if image_array.dtype != np.uint8:
        raise DataError(
            f"{images}: IDX images are {image_array.dtype.name}; imgclf reads 8-bit (uint8, 0..255) greyscale "
            "IDX images only: convert them to uint8"
        )
    if label_array.dtype.kind not in "iu":
        raise DataError(
            f"{labels}: IDX labels are {label_array.dtype.name}; labels must be integer class indices "
            "(uint8, int8, int16 or int32)"
        )
    bad = np.flatnonzero((label_array < 0) | (label_array >= MAX_CLASSES))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{labels}: label {int(label_array[i])} at index {i} is not a class index (0..{MAX_CLASSES - 1}); "
            f"{len(bad)} labels are out of range: fix the labels file"
        )


def scan_idx(root: Path) -> ScanResult:
    samples = []
    pairs = find_idx_pairs(root)
    max_label, largest = 0, ""
    label_arrays = {}
    for prefix, (images, labels) in pairs.items():
        image_array, label_array = read_idx(str(images)), read_idx(str(labels))
        _check_pair(images, labels, image_array, label_array)
        label_arrays[prefix] = label_array
        if len(label_array) and int(label_array.max()) >= max_label:
            max_label = int(label_array.max())
            largest = f" (label {max_label} at index {int(label_array.argmax())} of {labels.name})"
    names = class_names(root, max_label + 1, largest)  # a label past classes.txt's names is refused there
    for prefix, (images, _) in pairs.items():
        split = _split_of(prefix)
        for i, label in enumerate(label_arrays[prefix].tolist()):
            samples.append(Sample(str(images), names[label], split, images.name, str(i), IdxReader.kind))
    return ScanResult(str(root), IdxSource.kind, samples)


class IdxSource(Source):
    kind = "idx"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return bool(find_idx_pairs(path))

    @classmethod
    def scan(cls, path: Path) -> ScanResult:
        return scan_idx(path)


class IdxReader(Reader):
    """An image inside an IDX file: its bytes are its raw pixels (what the audit hashes), its
    picture those pixels as greyscale. The file itself was validated when it was scanned."""

    kind = "idx"
    small_by_design = True  # MNIST-style data sets are 28 px by design

    def _array(self, sample: Sample) -> np.ndarray:
        try:
            return read_idx(sample.path)[int(sample.member)]
        except (DataError, IndexError, ValueError) as exc:
            raise ImageError(sample.ref, f"cannot read IDX image ({exc})") from None

    def read(self, sample: Sample) -> bytes:
        return self._array(sample).tobytes()

    def decode(
        self, sample: Sample, data: bytes, draft_size: int | None, max_pixels: int
    ) -> tuple[Image.Image, tuple[int, int]]:
        height, width = self._array(sample).shape
        image = Image.frombytes("L", (width, height), data).convert("RGB")
        return image, (width, height)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip when the name ends in .gz): used by tests and tools."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array).tobytes())


def download(name: str, folder: str | Path) -> Path:
    """Download a known IDX data set into ``folder`` and check each file's MD5 (needs a network)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}'; known: {', '.join(DATASETS)}")
    spec, target = DATASETS[name], Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    for filename in _FILES:
        destination = target / filename
        if not destination.exists() or _md5(destination) != spec["md5"][filename]:
            partial = destination.with_suffix(".part")
            try:  # the engine of imgclf fetch: retries with backoff, deadlines, a size cap
                download_file(spec["base"] + filename, partial, DOWNLOAD_LIMITS)
            except (Failure, OSError) as exc:
                partial.unlink(missing_ok=True)
                raise DataError(f"cannot download {spec['base'] + filename}: {exc}") from None
            if _md5(partial) != spec["md5"][filename]:
                partial.unlink()
                raise DataError(f"{filename}: checksum mismatch after download")
            partial.replace(destination)
    (target / "classes.txt").write_text("\n".join(spec["classes"]) + "\n", encoding="utf-8")
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
