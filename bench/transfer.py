"""Transfer learning on a small product-photo set, side by side in one run:

(a) the retrain.py recipe: frozen EfficientNet-Lite0 features (fp32, centre crop) + scikit-learn
    logistic regression -- the quality floor;
(b) imgclf --mode head (cold feature cache), then (b2) a second head run (MLP head, warm cache);
(c) imgclf --mode finetune;
(d) imgclf with its defaults;
and the training speed of (c) against a plain timm/PyTorch loop on the same model, image size and
batch (ImageFolder + timm transforms + DataLoader workers, bf16 autocast + channels_last, all layers).

  .venv/bin/python bench/transfer.py ../shared/datasets/clothing-small [--skip-default]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMGCLF = str(Path(sys.executable).with_name("imgclf"))


def run_imgclf(data: str, out: Path, args: list[str], cache: str) -> dict:
    env = {**os.environ, "IMGCLF_CACHE_DIR": cache}
    started = time.perf_counter()
    done = subprocess.run([IMGCLF, "train", data, "--out", str(out), *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"imgclf {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    return {
        "seconds": seconds,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "mode": settings["train"]["mode"],
        "out": str(out),
    }


def floor(data: str) -> dict:
    """Frozen Lite0 features in fp32 + logistic regression, trained on train, scored on test."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from imgclf.data.dataset import decode_all
    from imgclf.data.sources import scan
    from imgclf.data.transforms import eval_tensor, normalize_batch
    from imgclf.models.factory import create_model, preprocessing_for

    started = time.perf_counter()
    samples = scan(data).samples
    model = create_model("tf_efficientnet_lite0", 10, pretrained=True).eval()
    prep = preprocessing_for(model, "tf_efficientnet_lite0", 224)
    tensors, _ = decode_all(samples, lambda im: eval_tensor(im, prep), prep, "floor decode")
    features = []
    with torch.no_grad():
        for start in range(0, len(tensors), 32):
            batch = normalize_batch(torch.stack(tensors[start : start + 32]), prep)
            features.append(model.forward_head(model.forward_features(batch), pre_logits=True))
    x = torch.cat(features).numpy()
    labels = np.array([s.label for s in samples])
    splits = np.array([s.split for s in samples])
    clf = LogisticRegression(max_iter=2000).fit(x[splits == "train"], labels[splits == "train"])
    return {"seconds": time.perf_counter() - started, "top1": clf.score(x[splits == "test"], labels[splits == "test"])}


def plain_timm_loop(data: str, steps: int = 12, warmup: int = 3, batch_size: int = 64) -> float:
    """Images/s of a plain fine-tuning loop as timm's train.py runs it (--amp bf16 --channels-last)."""
    import timm
    import torch
    from torchvision.datasets import ImageFolder

    from imgclf.models.factory import create_model

    model = create_model("tf_efficientnet_lite0", 10, pretrained=True).to(memory_format=torch.channels_last)
    transform = timm.data.create_transform(
        224, is_training=True, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    dataset = ImageFolder(str(Path(data) / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size, shuffle=True, num_workers=2, drop_last=True, persistent_workers=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    seen, started = 0, None
    iterator = iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            seen, started = 0, time.perf_counter()
        x, y = next(iterator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", default="../shared/datasets/clothing-small")
    parser.add_argument("--skip-default", action="store_true", help="leave out (d) when it equals (c)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-transfer-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; data: {args.data}", flush=True)
    results = {"a_floor": floor(args.data)}
    print(f"(a) floor: {results['a_floor']}", flush=True)
    cache = str(work / "cache-head")
    results["b_head"] = run_imgclf(args.data, work / "head", ["--mode", "head"], cache)
    print(f"(b) head: {results['b_head']}", flush=True)
    results["b2_head_mlp_warm"] = run_imgclf(
        args.data, work / "head2", ["--mode", "head", "--head-hidden", "512"], cache
    )
    print(f"(b2) second head, warm cache: {results['b2_head_mlp_warm']}", flush=True)
    results["c_finetune"] = run_imgclf(args.data, work / "finetune", ["--mode", "finetune"], str(work / "cache-ft"))
    history = (work / "finetune" / "history.csv").read_text().strip().splitlines()
    speeds = [float(line.split(",")[-1]) for line in history[1:]]
    results["c_finetune"]["train_images_per_s"] = sum(speeds) / len(speeds)
    print(f"(c) finetune: {results['c_finetune']}", flush=True)
    if not args.skip_default:
        results["d_default"] = run_imgclf(args.data, work / "default", [], str(work / "cache-default"))
        print(f"(d) default: {results['d_default']}", flush=True)
    plain = plain_timm_loop(args.data)
    results["plain_timm_images_per_s"] = plain
    results["finetune_speed_ratio"] = results["c_finetune"]["train_images_per_s"] / plain
    print(f"plain timm loop: {plain:.1f} img/s; imgclf finetune / plain = {results['finetune_speed_ratio']:.2f}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
