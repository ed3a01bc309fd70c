"""BAD_INPUTS case 49: many large photos decoded at once keep memory bounded. The audit decodes
one photo per core (each under the pixel cap), so its peak is the cores' photos, not the data
set's: measured in a process of its own on eight 9000x9000 PNGs (324 MB each decoded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest

SIDE = 9000
DECODED = SIDE * SIDE * 4  # bytes of one decoded RGB photo (Pillow keeps RGB in 4 bytes a pixel)


def _solid_png(path, colour: tuple[int, int, int]) -> None:
    """A valid 9000x9000 RGB PNG written row by row: the test never holds the pixels."""
    row = b"\x00" + bytes(colour) * SIDE
    packer = zlib.compressobj(6)
    body = b"".join(packer.compress(row) for _ in range(SIDE)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = SIDE.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _tiny_png(shade: int = 0) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (1 + shade, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def _measured(script: str, args: list, cache, timeout: float) -> dict:
    """Run ``script`` in a process of its own (its peak memory is its own) and return the JSON
    object it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "IMGCLF_CACHE_DIR": str(cache)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def large_pngs(tmp_path_factory):
    """Eight 9000x9000 PNGs in two classes (red, blue), each its own shade."""
    root = tmp_path_factory.mktemp("large") / "data"
    for label, colour in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
        (root / label).mkdir(parents=True)
        for n in range(4):
            _solid_png(root / label / f"{n}.png", (colour[0], colour[1] + n, colour[2]))
    return root


@pytest.mark.slow
def test_training_on_many_large_pngs_keeps_memory_to_a_photo_per_decoder(large_pngs, tmp_path):
    """Training decodes each photo once, in turn, and keeps it at the network's input size (the
    memory cache holds 32 px tensors, not 9000 px photos): the process's peak grows by a few
    decoded photos, where the eight at once would be 2.6 GB."""
    script = (
        "import json, resource, sys\n"
        "import imgclf\n"
        "asked = {'model': 'cnn1', 'image_size': 32, 'epochs': 1, 'time_budget': '0', 'threads': 1}\n"
        "imgclf.train(sys.argv[3], sys.argv[2] + '-warm', asked)  # imports and first allocations\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "result = imgclf.train(sys.argv[1], sys.argv[2], asked)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'before': before * 1024, 'after': after * 1024, 'children': children * 1024,"
        " 'status': result.status}))\n"
    )
    for label in ("a", "b"):
        (tmp_path / "warm" / label).mkdir(parents=True)
        for n in range(4):
            (tmp_path / "warm" / label / f"{n}.png").write_bytes(_tiny_png(n))
    measured = _measured(script, [large_pngs, tmp_path / "run", tmp_path / "warm"], tmp_path / "cache", 400)
    assert measured["status"] == "finished"
    grew = measured["after"] - measured["before"]
    print(f"training on 8 9000x9000 PNGs: peak +{grew / 2**20:.0f} MB, children {measured['children'] / 2**20:.0f} MB")
    # the check (2 decoders) and the cache's decoding, a photo each, and slack; not 8 at once
    assert grew < 4 * DECODED, f"training's memory grew by {grew / 2**20:.0f} MB"
    assert measured["children"] < 4 * DECODED, f"a child process peaked at {measured['children'] / 2**20:.0f} MB"


@pytest.mark.slow
def test_auditing_many_large_pngs_keeps_memory_to_a_photo_per_core(large_pngs, tmp_path):
    (tmp_path / "warm" / "a").mkdir(parents=True)  # a first check imports everything it needs
    (tmp_path / "warm" / "b").mkdir(parents=True)
    for label in ("a", "b"):
        _small = tmp_path / "warm" / label / "x.png"
        _small.write_bytes(_tiny_png())
    script = (
        "import json, resource, sys\n"
        "import imgclf\n"
        "imgclf.check(sys.argv[2])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "report = imgclf.check(sys.argv[1], settings={'audit_workers': 2})\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'before': before * 1024, 'after': after * 1024, 'usable': len(report.usable)}))\n"
    )
    measured = _measured(script, [large_pngs, tmp_path / "warm"], tmp_path / "cache", 300)
    assert measured["usable"] == 8
    grew = measured["after"] - measured["before"]
    # two workers, a photo each (and some slack); all eight at once would be 2.6 GB
    assert grew < 3 * DECODED, f"the audit's memory grew by {grew / 2**20:.0f} MB"
