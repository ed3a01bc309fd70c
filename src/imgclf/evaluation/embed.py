"""What the model "sees": penultimate-layer vectors for every image, as TensorBoard's projector
reads them, as NumPy, and as 2-D maps (PCA and t-SNE); and the nearest training photos of an image
(a quick way to find duplicates and mislabelled photos)."""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from imgclf.core.errors import ImageError, batch_memory
from imgclf.core.events import Events, StopToken, Tracker, channel, ignore, info, skipped, stop_token
from imgclf.core.rundir import RunDir
from imgclf.data.dataset import open_for, prefetch_batches
from imgclf.data.sources import Sample, open_sample, scan
from imgclf.data.split import read_split_csv
from imgclf.data.transforms import eval_tensor
from imgclf.evaluation.plots import plot_embedding_map
from imgclf.models.device import model_input
from imgclf.models.heads import pooled_features
from imgclf.predictors.pytorch import Classifier, load_torch

SPRITE_SIDE = 64  # pixels per thumbnail in the projector's sprite
MAX_SPRITE = 8192  # TensorBoard's limit on the sprite image's side


@dataclass
class Embeddings:
    vectors: np.ndarray  # (n, d) float32
    samples: list[Sample]
    rows: list[int]  # position of each vector's sample in the list given to embed_samples


def embed_samples(
    clf: Classifier, samples: list[Sample], events: Events = ignore, stop: StopToken | None = None
) -> Embeddings:
    """Penultimate-layer vectors of the samples that decode (same preprocessing as prediction)."""
    prep, stop = clf.preprocessing, stop_token(stop)

    def load_one(index: int) -> torch.Tensor | None:
        try:
            return eval_tensor(open_for(samples[index], prep, clf.max_pixels), prep)
        except ImageError as exc:
            skipped(events, exc.path, exc.reason)
            return None

    vectors, kept = [], []
    tracker = Tracker(events, "embed", len(samples))
    with torch.no_grad():
        for chunk, good, batch in prefetch_batches(len(samples), load_one, clf.batch_size):
            if batch is not None:
                with batch_memory(len(batch), "embedding"), clf.runtime.autocast():
                    x = model_input(batch, clf.runtime, prep)
                    vectors.append(pooled_features(clf.model, x).float().cpu().numpy())
                kept += good
            tracker.advance(len(chunk))
            stop.check()
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return Embeddings(matrix.astype(np.float32), [samples[i] for i in kept], kept)


def _sprite(samples: list[Sample], path: Path) -> int:
    """One image of thumbnails in row-major order, as the projector expects; returns the side."""
    per_row = math.ceil(math.sqrt(len(samples)))
    side = max(8, min(SPRITE_SIDE, MAX_SPRITE // max(per_row, 1)))
    sheet = Image.new("RGB", (per_row * side, per_row * side), "white")
    for i, sample in enumerate(samples):
        try:
            thumb = open_sample(sample).resize((side, side))
        except ImageError:
            continue
        sheet.paste(thumb, ((i % per_row) * side, (i // per_row) * side))
    sheet.save(path)
    return side


def write_projector(emb: Embeddings, out: Path) -> None:
    """tensors.tsv, metadata.tsv, sprite.png and projector_config.pbtxt for TensorBoard's projector."""
    np.savetxt(out / "tensors.tsv", emb.vectors, delimiter="\t", fmt="%.5f")
    with open(out / "metadata.tsv", "w", encoding="utf-8", newline="") as handle:
        handle.write("label\tsplit\tpath\n")
        for s in emb.samples:
            handle.write(f"{s.label}\t{s.split or ''}\t{s.name}\n".replace("\r", " "))
    side = _sprite(emb.samples, out / "sprite.png")
    (out / "projector_config.pbtxt").write_text(
        'embeddings {\n  tensor_name: "imgclf"\n  tensor_path: "tensors.tsv"\n  metadata_path: "metadata.tsv"\n'
        f'  sprite {{\n    image_path: "sprite.png"\n    single_image_dim: {side}\n    single_image_dim: {side}\n'
        "  }\n}\n"
    )


def map_2d(vectors: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA

    if method == "pca" or len(vectors) < 5:
        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    from sklearn.manifold import TSNE

    reduced = PCA(n_components=min(50, vectors.shape[1], len(vectors)), random_state=seed).fit_transform(vectors)
    perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def embed(
    clf: Classifier,
    run_dir: str | Path,
    data: str | None,
    out: str | Path,
    events: Events | None = None,
    stop: StopToken | None = None,
    max_tsne: int = 5000,
) -> Path:
    """Embeddings of ``data`` (or of the run's own split) with the run's model, written to ``out``."""
    out, events = Path(out), channel(events)
    out.mkdir(parents=True, exist_ok=True)
    samples = scan(data).samples if data else read_split_csv(Path(run_dir) / RunDir.SPLIT)
    emb = embed_samples(clf, samples, events, stop)
    np.save(out / "embeddings.npy", emb.vectors)
    with open(out / "embeddings.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path", "label", "split"])
        writer.writerows([i, s.name, s.label, s.split or ""] for i, s in enumerate(emb.samples))
    write_projector(emb, out)
    labels = [s.label for s in emb.samples]
    thumbs = emb.samples if len(emb.samples) <= 300 else None
    plot_embedding_map(map_2d(emb.vectors, "pca"), labels, out / "map_pca.png", "PCA", thumbs)
    subset = slice(0, max_tsne)
    plot_embedding_map(
        map_2d(emb.vectors[subset], "tsne"),
        labels[subset],
        out / "map_tsne.png",
        "t-SNE",
        thumbs[subset] if thumbs else None,
    )
    info(
        events,
        f"{len(emb.samples)} embeddings ({emb.vectors.shape[1]}-d) in {out}; TensorBoard: tensorboard --logdir {out}",
        str(out),
    )
    return out


def similar(
    clf: Classifier,
    run_dir: str | Path,
    image: str,
    k: int = 8,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> list[dict]:
    """The ``k`` training photos nearest to ``image`` by cosine similarity of embeddings."""
    run_dir, events = Path(run_dir), channel(events)
    train = [s for s in read_split_csv(run_dir / RunDir.SPLIT) if s.split == "train"]
    weights_id = hashlib.sha1((run_dir / RunDir.WEIGHTS).read_bytes()).hexdigest()[:16]
    index_path = run_dir / f"similar-index-{weights_id}.safetensors"
    if index_path.exists():  # cached per model weights: retraining makes a new index
        saved = load_file(str(index_path))
        vectors, kept = saved["vectors"].numpy(), [train[r] for r in saved["rows"].tolist()]
    else:
        emb = embed_samples(clf, train, events, stop)
        vectors, kept = emb.vectors, emb.samples
        save_file({"vectors": torch.from_numpy(vectors), "rows": torch.tensor(emb.rows)}, str(index_path))
    query = embed_samples(clf, [Sample(str(image), "", None)])
    if not len(query.samples):
        raise ImageError(str(image), "cannot be read")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    q = query.vectors[0] / max(np.linalg.norm(query.vectors[0]), 1e-12)
    scores = unit @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"path": kept[i].path, "label": kept[i].label, "similarity": float(scores[i])} for i in order]


def log_to_tensorboard(run_dir: str | Path, samples: list[Sample], limit: int = 1000) -> None:
    """Add the confusion matrix picture and the embeddings of (up to ``limit``) evaluated images,
    with thumbnails, to the run's TensorBoard log."""
    from torch.utils.tensorboard import SummaryWriter  # TensorBoard's import is slow; only this needs it

    run_dir = Path(run_dir)
    clf = load_torch(run_dir)
    step = max(1, len(samples) // limit)
    emb = embed_samples(clf, samples[::step][:limit])
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for name in (RunDir.CONFUSION, RunDir.RELIABILITY):
            if (run_dir / name).exists():
                picture = np.asarray(Image.open(run_dir / name).convert("RGB"))
                writer.add_image(Path(name).stem, picture, dataformats="HWC")
        if len(emb.samples):
            thumbs = (
                torch.stack(
                    [
                        torch.from_numpy(np.array(open_sample(s).resize((32, 32)), dtype=np.uint8)).permute(2, 0, 1)
                        for s in emb.samples
                    ]
                ).float()
                / 255
            )
            writer.add_embedding(
                torch.from_numpy(emb.vectors),
                metadata=[s.label for s in emb.samples],
                label_img=thumbs,
                # each evaluation its own step: TensorBoard prints a warning when one is written twice
                global_step=len([p for p in (run_dir / RunDir.TENSORBOARD).iterdir() if p.name.isdigit()]),
                tag="evaluated images",
            )
