"""CPU speed of the hot paths, side by side in one run, each variant in its own process (the
allocator tuning is process-wide and cannot be undone): EfficientNet-Lite0 at 224 px frozen
forward (feature extraction), a fine-tune step (whole, or split: frozen layers apart), and the
scratch cnn4 at 64 px. Prints a Markdown table with the CPU model and flags.

    .venv/bin/python bench/cpu.py            # all variants, about 3 minutes on 2 cores
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

VARIANTS = [
    # (name, job, layout, precision, tuned allocator)
    ("frozen forward, eager NCHW fp32 (before)", "forward", "nchw", "fp32", False),
    ("frozen forward, channels_last bf16 (before: imgclf's)", "forward", "cl", "bf16", False),
    ("frozen forward, channels_last bf16, allocator tuned (after)", "forward", "cl", "bf16", True),
    ("frozen forward, channels_last fp32, allocator tuned", "forward", "cl", "fp32", True),
    ("fine-tune step, whole, channels_last bf16 (before)", "finetune", "cl", "bf16", False),
    ("fine-tune step, whole, channels_last bf16, allocator tuned", "finetune", "cl", "bf16", True),
    ("fine-tune step, split: frozen bf16 + trained fp32, allocator tuned (after)", "split", "cl", "fp32", True),
    ("fine-tune step, split: frozen bf16 + trained bf16, allocator tuned", "split", "cl", "bf16", True),
    ("cnn4 64 px step, channels_last bf16 (before)", "cnn4", "cl", "bf16", False),
    ("cnn4 64 px step, channels_last bf16, allocator tuned (after)", "cnn4", "cl", "bf16", True),
    ("cnn4 64 px step, NCHW fp32, allocator tuned", "cnn4", "nchw", "fp32", True),
]


def _rate(work, images: int, repeats: int) -> float:
    work()
    work()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return images * repeats / (time.perf_counter() - started)


def run_variant(job: str, layout: str, precision: str, tuned: bool) -> dict:
    import resource

    import torch

    from imgclf.models.device import tune_allocator

    if tuned:
        tune_allocator()
    from imgclf.models.factory import create_model, freeze_early_layers
    from imgclf.models.heads import pooled_features
    from imgclf.training.split import split_for

    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    dtype = torch.bfloat16 if precision == "bf16" else None

    def autocast(dt=dtype):
        return torch.autocast("cpu", dtype=dt or torch.float32, enabled=dt is not None)

    torch.manual_seed(0)
    if job == "cnn4":
        model, side, batch = create_model("cnn4", 10), 64, 64
    else:
        model, side, batch = create_model("tf_efficientnet_lite0", 10, pretrained=True), 224, 32
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    if job == "forward":
        model.eval()

        def work():
            with torch.no_grad(), autocast():
                pooled_features(model, x)

        rate = _rate(work, batch, 5)
    else:
        if job != "cnn4":
            freeze_early_layers(model, 8)
        model.train()
        for module in model.modules():
            if job != "cnn4" and isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
        split = split_for(model, 8) if job == "split" else None

        def work():
            if split is not None:  # the frozen part as split fine-tuning runs it: no_grad, bf16
                with torch.no_grad(), autocast(torch.bfloat16):
                    h = split.prefix(x)
                with autocast():
                    logits = split.suffix(h.float().contiguous(memory_format=fmt))
            else:
                with autocast():
                    logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        rate = _rate(work, batch, 4 if job != "cnn4" else 15)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"img_s": round(rate, 1), "system_s": round(usage.ru_stime, 1), "user_s": round(usage.ru_utime, 1)}


def main() -> None:
    from imgclf.core.machine import cpu_flags, cpu_model

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512f", "amx", "avx2", "avx512_bf16")))
    print(f"CPU: {cpu_model()} ({', '.join(flags)}); 2 threads\n")
    print("| variant | img/s | system s | user s |\n|---|---:|---:|---:|")
    for name, *spec in VARIANTS:
        done = subprocess.run(
            [sys.executable, __file__, "--variant", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=True,
            env={"OMP_NUM_THREADS": "2", "PATH": ""},
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {name} | {result['img_s']} | {result['system_s']} | {result['user_s']} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--variant":
        print(json.dumps(run_variant(*json.loads(sys.argv[2]))))
    else:
        main()
