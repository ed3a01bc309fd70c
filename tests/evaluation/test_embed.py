"""Embeddings in TensorBoard's projector format, 2-D maps, and nearest training photos."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from imgclf.cli import main
from imgclf.data.split import read_split_csv
from tests.conftest import write_manifest


def test_embed_writes_a_valid_projector_folder_and_maps(digits_run, digits_dir, tmp_path):
    data = write_manifest(digits_dir, tmp_path / "m.csv", per_class=12)
    out = tmp_path / "emb"
    assert main(["embed", str(digits_run), str(data), "--out", str(out)]) == 0
    vectors = np.load(out / "embeddings.npy")
    tensors = np.loadtxt(out / "tensors.tsv", delimiter="\t")
    metadata = (out / "metadata.tsv").read_text().strip().splitlines()
    assert vectors.shape[0] == 120 and tensors.shape == vectors.shape
    assert np.allclose(tensors, vectors, atol=1e-4)
    assert metadata[0] == "label\tsplit\tpath" and len(metadata) == 121
    config = (out / "projector_config.pbtxt").read_text()
    for name in re.findall(r'(?:tensor_path|metadata_path|image_path): "([^"]+)"', config):
        assert (out / name).exists(), name
    side = int(re.search(r"single_image_dim: (\d+)", config).group(1))
    sprite = Image.open(out / "sprite.png")
    per_row = int(np.ceil(np.sqrt(120)))
    assert sprite.size == (per_row * side, per_row * side)
    for name in ("map_pca.png", "map_tsne.png", "embeddings.csv"):
        assert (out / name).stat().st_size > 0


def test_similar_returns_the_training_photo_itself_first(digits_run, capsys):
    train = [s for s in read_split_csv(digits_run / "split.csv") if s.split == "train"]
    photo = train[17].path
    assert main(["similar", str(digits_run), photo, "--k", "5"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 5
    first_score, first_label, first_path = rows[0].split("\t")
    assert first_path == photo and float(first_score) > 0.999
    assert main(["similar", str(digits_run), photo, "--k", "3"]) == 0  # second call uses the cached index
    assert capsys.readouterr().out.strip().splitlines()[0].endswith(photo)
