"""One handler per command: translate the arguments, call the library verb, show the result.
Each returns the exit status (0 done, 1 nothing to do, 3 stopped and resumable)."""

from __future__ import annotations

import argparse
import glob
import os
from dataclasses import dataclass

from imgclf import api
from imgclf.cli import render
from imgclf.cli.parser import overrides
from imgclf.core.events import Events, StopToken
from imgclf.core.settings import Settings, load_settings
from imgclf.data.audit import format_report
from imgclf.data.images import is_image_name


@dataclass
class Context:
    events: Events
    stop: StopToken

    def settings(self, args: argparse.Namespace) -> Settings:
        return load_settings(getattr(args, "config", None), overrides(args, args.command))


def check(args: argparse.Namespace, ctx: Context) -> int:
    report = api.check(args.data, args.json_path, ctx.settings(args), events=ctx.events, stop=ctx.stop)
    render.say(format_report(report))
    return 0


def train(args: argparse.Namespace, ctx: Context) -> int:
    if args.resume == "auto":
        result = api.train(args.data, args.out, ctx.settings(args), events=ctx.events, stop=ctx.stop, resume="auto")
    elif args.resume:
        result = api.train(None, args.resume, overrides(args, "train"), events=ctx.events, stop=ctx.stop, resume=True)
    else:
        result = api.train(args.data, args.out, ctx.settings(args), events=ctx.events, stop=ctx.stop)
    if result.status == "stopped" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 0  # under torchrun a stop was asked for: a non-zero exit would make it restart the run
    return 0 if result.status == "finished" else 3


def compare(args: argparse.Namespace, ctx: Context) -> int:
    sizes = [int(n) for n in args.per_class_sizes.split(",") if n.strip()]
    candidates = [m for m in args.models.split(",") if m.strip()]
    api.compare(
        args.data,
        args.out,
        ctx.settings(args),
        candidates=candidates,
        per_class=sizes,
        events=ctx.events,
        stop=ctx.stop,
    )
    return 0


def evaluate(args: argparse.Namespace, ctx: Context) -> int:
    api.evaluate(args.run_dir, args.out, ctx.settings(args), data=args.data, events=ctx.events, stop=ctx.stop)
    return 0


def embed(args: argparse.Namespace, ctx: Context) -> int:
    api.embed(args.run_dir, args.out, ctx.settings(args), data=args.data, events=ctx.events, stop=ctx.stop)
    return 0


def similar(args: argparse.Namespace, ctx: Context) -> int:
    for row in api.similar(args.run_dir, args.image, ctx.settings(args), k=args.k, events=ctx.events, stop=ctx.stop):
        render.say(f"{row['similarity']:.4f}\t{row['label']}\t{row['path']}")
    return 0


def predict(args: argparse.Namespace, ctx: Context) -> int:
    settings = ctx.settings(args)
    files, missing = expand_inputs(args.inputs)
    for item in missing:
        render.error_line(f"{item}: no such file")
    clf = api.load(args.run_dir, settings, events=ctx.events)
    p = settings.predict
    results = clf.predict_files(
        files, k=p.top_k, min_confidence=p.min_confidence or None, events=ctx.events, stop=ctx.stop
    )
    bad = render.predictions(results, p.format, min(p.top_k, len(clf.classes_)), bool(p.min_confidence))
    return 0 if files and bad < len(files) else 1  # 1: nothing given, or not one file could be read


def export(args: argparse.Namespace, ctx: Context) -> int:
    api.export(args.run_dir, args.out, ctx.settings(args), int8=args.int8, events=ctx.events, stop=ctx.stop)
    return 0


def serve(args: argparse.Namespace, ctx: Context) -> int:
    from imgclf import serve as service  # the service's packages (FastAPI, uvicorn) are an optional extra

    if args.action == ["keys", "create"]:
        render.say(service.create_key(args.home, args.scope, args.name, args.db))
        return 0
    if args.action:
        render.error_line(f"serve: unknown action '{' '.join(args.action)}' (expected: keys create)")
        return 2
    limits = service.Limits(url_uploads=args.allow_url_uploads, url_allow_hosts=tuple(args.url_allow_hosts))
    service.run_service(args.home, args.host, args.port, not args.no_worker, limits, args.db, args.train_threads)
    return 0


def worker(args: argparse.Namespace, ctx: Context) -> int:
    """A training worker alone: claims the service's jobs from the shared database until stopped."""
    from imgclf.serve.worker import serve_jobs  # the service's packages are an optional extra

    serve_jobs(args.home, ctx.stop, args.db, args.lease)
    return 0


def fetch(args: argparse.Namespace, ctx: Context) -> int:
    if not args.inputs and not args.from_img2dataset:
        render.error_line("fetch: give URL lists (files or a folder), or --from-img2dataset DIR")
        return 2
    summary = api.fetch(
        [args.from_img2dataset] if args.from_img2dataset else args.inputs,
        args.out,
        ctx.settings(args),
        names=args.names,
        placeholders=args.placeholders,
        retry_failed=args.retry_failed,
        dry_run=args.dry_run,
        from_img2dataset=bool(args.from_img2dataset),
        label_column=args.label_column,
        events=ctx.events,
        stop=ctx.stop,
    )
    render.fetch_summary(summary)
    if summary.stopped:
        return 130 if "SIGINT" in summary.stopped else 3
    return 0


def shard(args: argparse.Namespace, ctx: Context) -> int:
    summary = api.shard(args.data, args.out, ctx.settings(args), events=ctx.events, stop=ctx.stop)
    done = "complete" if summary.complete else "incomplete: the other parts are still to run"
    render.say(
        f"{summary.out}: {summary.samples} photos in {summary.shards} shards ({done}); this run wrote "
        f"{len(summary.written)}, kept {summary.kept} already complete; {summary.skipped} files left out"
    )
    return 0


def datasets(args: argparse.Namespace, ctx: Context) -> int:
    from imgclf.data.sources.idx import download  # the one command that uses the network

    render.say(f"downloaded to {download(args.name, args.folder)}")
    return 0


def demo(args: argparse.Namespace, ctx: Context) -> int:
    from imgclf.demo import run_demo  # the demo layer sits above the api, beside the faces

    result = run_demo(args.data, args.out, events=ctx.events, stop=ctx.stop)
    for path, predicted, true in result.examples:
        render.say(f"  {path}: predicted {predicted} (true {true})")
    if result.status != "finished":
        return 3
    metrics = result.metrics
    render.say(
        f"\ntest top-1 {metrics.get('top1', float('nan')):.3f} on {metrics.get('n', 0)} images; report: {result.report}"
    )
    return 0


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Files from files, folders (recursive, image names only, symlinked folders followed once)
    and globs, each file once however often it is reached (a symlink loop, a file given twice);
    and the inputs that matched nothing."""
    files, missing, seen = [], [], set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(path)

    for item in inputs:
        if os.path.isdir(item):
            for path in _images_under(item):
                add(path)
        elif os.path.exists(item):
            add(item)
        else:
            matched = sorted(glob.glob(item, recursive=True))  # ** follows links: a loop repeats, bounded by ELOOP
            for path in matched:
                if os.path.isfile(path):
                    add(path)
            if not matched:
                missing.append(item)
    return files, missing


def _images_under(folder: str):
    visited = set()  # (device, inode) of each folder entered: a symlink loop is entered once
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in visited:
            dirnames[:] = []
            continue
        visited.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if is_image_name(f))


HANDLERS = {
    "check": check,
    "train": train,
    "compare": compare,
    "evaluate": evaluate,
    "embed": embed,
    "similar": similar,
    "predict": predict,
    "export": export,
    "serve": serve,
    "worker": worker,
    "fetch": fetch,
    "shard": shard,
    "datasets": datasets,
    "demo": demo,
}
