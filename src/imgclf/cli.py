"""The command line: arguments -> settings -> one library call. Nothing else happens here.

Flags are generated from the settings fields (name, type, default, help), so ``imgclf train
--help`` shows every default and a setting is never declared twice.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

from imgclf.settings import Settings, SettingsError, section_fields

SECTIONS_FOR = {"check": ("data",), "train": ("data", "model", "train", "evaluate"), "predict": ("predict",)}


def _add_setting_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...], skip: tuple[str, ...] = ()) -> None:
    """One flag per setting; flags that are not given leave the setting to the config/defaults."""
    for section in sections:
        group = parser.add_argument_group(f"{section} settings")
        for spec in section_fields(section):
            if spec.name in skip:
                continue
            flag = "--" + spec.name.replace("_", "-")
            help_text = f"{spec.metadata['help']} (default: {spec.default})"
            if isinstance(spec.default, bool):
                group.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(flag, dest=spec.name, type=type(spec.default), default=argparse.SUPPRESS,
                                   choices=spec.metadata.get("choices"), help=help_text,
                                   metavar=spec.name.upper() if not spec.metadata.get("choices") else None)


def _overrides(args: argparse.Namespace, sections: tuple[str, ...]) -> dict:
    names = {spec.name for section in sections for spec in section_fields(section)}
    return {name: value for name, value in vars(args).items() if name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgclf", description="Photos in folders -> a classifier you can trust.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="audit a data set: unreadable files, duplicates, leakage, class counts")
    p.add_argument("data", help="folder of class folders, split folders, a CSV manifest or IDX files")
    p.add_argument("--json", dest="json_path", help="also write the full report as JSON to this file")
    _add_setting_flags(p, SECTIONS_FOR["check"])

    p = sub.add_parser("train", help="train a classifier (audit, split, train, evaluate)")
    p.add_argument("data", nargs="?", help="folder of class folders, split folders, a CSV manifest or IDX files")
    p.add_argument("--out", default="runs/run", help="run folder to create (default: runs/run)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--config", help="JSON file of settings (flat or by section); flags override it")
    _add_setting_flags(p, SECTIONS_FOR["train"])

    p = sub.add_parser("compare", help="train several models on the same split and keep the best by validation")
    p.add_argument("data", help="folder of class folders, split folders, a CSV manifest or IDX files")
    p.add_argument("--models", required=True,
                   help="comma-separated MODEL[:MODE] candidates, e.g. cnn3,cnn4,tf_efficientnet_lite0:head")
    p.add_argument("--per-class", dest="per_class_sizes", default="",
                   help="comma-separated photos-per-class sizes to train each candidate at (plots accuracy vs N)")
    p.add_argument("--out", default="runs/compare", help="folder for the runs and the leaderboard")
    _add_setting_flags(p, SECTIONS_FOR["train"], skip=("model", "mode", "per_class"))

    p = sub.add_parser("evaluate", help="evaluate a run on its test split (or on other labelled data)")
    p.add_argument("run_dir")
    p.add_argument("data", nargs="?", help="labelled data to evaluate on instead of the run's test split")

    p = sub.add_parser("embed", help="embeddings for TensorBoard's projector, NumPy, and PCA/t-SNE maps")
    p.add_argument("run_dir")
    p.add_argument("data", nargs="?", help="labelled data to embed (default: the run's own images)")
    p.add_argument("--out", required=True, help="folder for the embedding files")

    p = sub.add_parser("similar", help="the training photos nearest to an image")
    p.add_argument("run_dir")
    p.add_argument("image")
    p.add_argument("--k", type=int, default=8, help="how many neighbours (default: 8)")

    p = sub.add_parser("predict", help="label image files with a trained model")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    _add_setting_flags(p, SECTIONS_FOR["predict"])

    p = sub.add_parser("export", help="export a trained model to ONNX (checked against PyTorch)")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--int8", action="store_true", help="also write a static int8 model (calibrated, checked)")
    p.add_argument("--out", help="folder for the exported bundle (default: RUN_DIR/onnx)")

    p = sub.add_parser("datasets", help="get public data sets (needs a network)")
    p.add_argument("action", choices=["download"])
    p.add_argument("name", choices=["fashion-mnist", "mnist"])
    p.add_argument("folder")

    p = sub.add_parser("demo", help="the embedded default: scikit-learn digits, check -> train -> predict")
    p.add_argument("--data", default="demo_data/digits", help="where to write the digit images")
    p.add_argument("--out", default="runs/digits", help="run folder")
    return parser


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Files from files, folders (recursive, image names only) and globs; and inputs that matched nothing."""
    from imgclf.data.images import is_image_name

    files, missing = [], []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_name(f)]
        elif os.path.exists(item):
            files.append(item)
        else:
            matched = sorted(glob.glob(item, recursive=True))
            files += [m for m in matched if os.path.isfile(m)]
            if not matched:
                missing.append(item)
    return files, missing


def _print_predictions(predictions, fmt: str, k: int, decided: bool = False) -> int:
    """Stream predictions as a table, a JSON array or CSV; returns the number of bad files.
    With ``decided`` (a confidence threshold in use) the decision comes first: a label or unknown."""
    bad = 0
    writer = csv.writer(sys.stdout) if fmt == "csv" else None
    if writer:
        writer.writerow(["path", "error"] + (["label"] if decided else [])
                        + [f"{c}{i}" for i in range(1, k + 1) for c in ("label", "prob")])
    if fmt == "json":
        sys.stdout.write("[")
    for n, pred in enumerate(predictions):
        bad += bool(pred.error)
        if pred.error:
            print(f"error: {pred.path}: {pred.error}", file=sys.stderr)
        if fmt == "json":
            sys.stdout.write(("," if n else "") + "\n  " + json.dumps(pred.to_dict(), ensure_ascii=False))
        elif writer:
            cells = [x for label, p in zip(pred.labels, pred.probs) for x in (label, f"{p:.6f}")]
            writer.writerow([pred.path, pred.error] + ([pred.label] if decided else []) + cells)
        elif not pred.error:
            first = [pred.label] if decided else []
            print("\t".join([pred.path, *first, *(f"{label} {p:.3f}" for label, p in zip(pred.labels, pred.probs))]))
    if fmt == "json":
        sys.stdout.write("\n]\n")
    return bad


def _predictor(run_dir: str, backend: str, batch_size: int, int8: bool = False):
    """The PyTorch bundle, or the ONNX export beside it (``RUN_DIR/onnx``, or RUN_DIR itself)."""
    onnx_dir = next((d for d in (os.path.join(run_dir, "onnx"), run_dir)
                     if os.path.exists(os.path.join(d, "model.onnx"))), None)
    if int8 and backend == "torch":
        raise SettingsError("--int8 runs on ONNX Runtime: use --backend onnx or auto, not torch")
    if int8 or backend in ("onnx", "openvino") or (backend == "auto" and onnx_dir):
        if onnx_dir is None:
            from imgclf.bundle import BundleError

            raise BundleError(f"{run_dir}: no ONNX export here; run imgclf export {run_dir} first")
        from imgclf.runtime import load_onnx

        clf = load_onnx(onnx_dir, int8=int8, batch_size=batch_size, backend=backend)
        print(f"backend: {clf.backend}{' int8' if int8 else ''} ({onnx_dir})", file=sys.stderr)
        return clf
    import imgclf

    return imgclf.load(run_dir, batch_size=batch_size)


def _run(args: argparse.Namespace) -> int:
    import imgclf

    if args.command == "check":
        from imgclf.data.audit import format_report

        report = imgclf.check(args.data, _overrides(args, SECTIONS_FOR["check"]), args.json_path)
        print(format_report(report))
        return 0
    if args.command == "train":
        from imgclf.settings import load_settings

        overrides = _overrides(args, SECTIONS_FOR["train"])
        if args.resume:
            result = imgclf.train(None, args.resume, resume=True)
        else:
            result = imgclf.train(args.data, args.out, settings=load_settings(args.config, overrides))
        return 0 if result.status == "finished" else 3
    if args.command == "compare":
        from imgclf.compare import compare

        sizes = [int(n) for n in args.per_class_sizes.split(",") if n.strip()]
        compare(args.data, [m for m in args.models.split(",") if m.strip()], args.out,
                _overrides(args, SECTIONS_FOR["train"]), sizes)
        return 0
    if args.command == "evaluate":
        imgclf.evaluate(args.run_dir, args.data)
        return 0
    if args.command == "embed":
        from imgclf.evaluation.embed import embed

        embed(args.run_dir, args.data, args.out)
        return 0
    if args.command == "similar":
        from imgclf.evaluation.embed import similar

        for row in similar(args.run_dir, args.image, args.k):
            print(f"{row['similarity']:.4f}\t{row['label']}\t{row['path']}")
        return 0
    if args.command == "predict":
        settings = Settings()
        from imgclf.settings import apply_overrides

        p = apply_overrides(settings, _overrides(args, SECTIONS_FOR["predict"])).predict
        files, missing = expand_inputs(args.inputs)
        for item in missing:
            print(f"error: {item}: no such file", file=sys.stderr)
        clf = _predictor(args.run_dir, p.backend, p.predict_batch_size, p.int8)
        predictions = clf.predict_files(files, k=p.top_k, progress=sys.stderr.isatty(),
                                        min_confidence=p.min_confidence or None)
        _print_predictions(predictions, p.format, min(p.top_k, len(clf.classes_)), bool(p.min_confidence))
        return 0 if files else 1
    if args.command == "export":
        from imgclf.export import export

        export(args.run_dir, args.out, int8=args.int8)
        return 0
    if args.command == "datasets":
        from imgclf.data.idx import download

        print(f"downloaded to {download(args.name, args.folder)}")
        return 0
    if args.command == "demo":
        from imgclf.demo import run_demo

        run_demo(args.data, args.out)
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    from imgclf.bundle import BundleError
    from imgclf.data.images import ImageError
    from imgclf.base import NoThresholdError
    from imgclf.data.scan import DataError
    from imgclf.export import ExportError
    from imgclf.models.factory import ModelError
    from imgclf.runtime import BackendError
    from imgclf.training.checkpoint import CheckpointError
    from imgclf.training.fit import TrainError

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (BundleError, DataError, ImageError, ModelError, SettingsError, CheckpointError, TrainError,
            ExportError, NoThresholdError, BackendError) as exc:
        print(f"imgclf: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imgclf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
