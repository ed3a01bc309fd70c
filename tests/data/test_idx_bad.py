"""IDX files that would be read wrong, or not at all, are clear errors (BAD_INPUTS.md 51): labels
out of range, labels that are not integers, images that are not 8-bit, a header that does not add
up, and a gzip bomb, which is refused without being inflated. The files are written here from the
format's definition (magic 0 0 dtype ndim, big-endian uint32 sizes, big-endian data), not by
imgclf's own writer, so a mistake in one is not hidden by the same mistake in the other."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from imgclf.core.errors import DataError
from imgclf.data.sources import open_sample, scan
from imgclf.data.sources.idx import read_idx

CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    kind = array.dtype.str[1:]
    header = bytes([0, 0, CODES[kind], array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def idx_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    return root


def pictures(n: int, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 128, (n, 28, 28)).astype(dtype)


def test_wider_integer_labels_are_read(tmp_path):
    # int16 and int32 labels are integers all the same: read, big-endian, as the format says
    images = pictures(4)
    for dtype in (np.int16, np.int32):
        root = idx_folder(tmp_path / np.dtype(dtype).name, images, np.array([2, 0, 300, 1], dtype))
        result = scan(root)
        assert [s.label for s in result.samples] == ["2", "0", "300", "1"]
        assert np.array_equal(np.asarray(open_sample(result.samples[2]))[..., 0], images[2])


def test_a_negative_label_is_a_clear_error(tmp_path):
    root = idx_folder(tmp_path / "idx", pictures(5), np.array([0, 1, 2, -1, 1], np.int8), ["a", "b", "c"])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label -1 at index 3 is not a class index"):
        scan(root)


def test_a_label_past_every_class_name_names_where_it_is(tmp_path):
    root = idx_folder(tmp_path / "idx", pictures(4), np.array([0, 5, 1, 2], np.uint8), ["a", "b", "c"])
    with pytest.raises(DataError, match=r"3 names for 6 classes \(label 5 at index 1 of train-labels-idx1-ubyte"):
        scan(root)
    # without classes.txt every label up to the largest is a class: one of 70,000 is no class index
    root = idx_folder(tmp_path / "huge", pictures(3), np.array([0, 70_000, 1], np.int32))
    with pytest.raises(DataError, match="label 70000 at index 1 is not a class index"):
        scan(root)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_labels_are_a_clear_error(tmp_path, dtype):
    root = idx_folder(tmp_path / "idx", pictures(3), np.array([0.0, 1.0, 1.5], dtype))
    with pytest.raises(DataError, match=f"train-labels-idx1-ubyte.gz: IDX labels are {np.dtype(dtype).name}"):
        scan(root)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_images_that_are_not_8_bit_are_a_clear_error(tmp_path, dtype):
    # read as 8-bit pixels they would be other pictures than the file holds: refused, not guessed at
    root = idx_folder(tmp_path / "idx", pictures(3, dtype), np.array([0, 1, 1], np.uint8))
    with pytest.raises(DataError, match=f"train-images-idx3-ubyte: IDX images are {np.dtype(dtype).name}"):
        scan(root)


def test_a_header_whose_size_overflows_is_a_clear_error(tmp_path):
    # 65536**4 is 2**64: a 64-bit product of the sizes wraps to 0, which an empty body would match
    path = tmp_path / "forged-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 4]) + (65536).to_bytes(4, "big") * 4)
    with pytest.raises(DataError, match="over the .* imgclf reads"):
        read_idx(str(path))


def _gzip_bomb(path: Path, header: bytes, megabytes: int) -> Path:
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(header)
        zeros = bytes(1 << 20)
        for _ in range(megabytes):
            handle.write(zeros)
    return path


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 28, 28), "IDX data is more than 1568 bytes, header says 1568; not read further"),
        ((60_000, 2048, 2048), "over the .* imgclf reads; not read"),  # a header that admits to the size
    ],
    ids=["header-says-1568-bytes", "header-says-251-GB"],
)
def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path, shape, message):
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in shape)
    path = _gzip_bomb(tmp_path / "bomb-images-idx3-ubyte.gz", header, megabytes=64)
    assert path.stat().st_size < 200_000  # 64 MB of zeros, as a bomb is: tiny on disk
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=message):
            read_idx(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # inflating the 64 MB would allocate them


def test_a_gzip_bomb_in_a_data_folder_is_a_clear_error(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    _gzip_bomb(root / "train-images-idx3-ubyte.gz", bytes([0, 0, 0x08, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]), 8)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1], np.uint8)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: IDX data is more than 1568 bytes"):
        scan(root)
