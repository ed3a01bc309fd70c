"""The command line's arguments. Setting flags are generated from the settings fields (name, type,
default, help), so ``imgclf train --help`` shows every default and a setting is never declared
twice; their values are checked by the settings, which name the setting and the allowed values."""

from __future__ import annotations

import argparse

from imgclf.core.settings import section_fields

SECTIONS_FOR = {
    "check": ("data", "system"),
    "train": ("data", "model", "train", "evaluate", "system"),
    "compare": ("data", "model", "train", "evaluate", "system"),
    "predict": ("predict", "system"),
    "evaluate": ("system",),
    "embed": ("system",),
    "similar": ("system",),
    "export": ("system",),
    "fetch": ("fetch",),
    "shard": ("data", "shard", "system"),
}
# settings of other sections that a command reads too (fetch checks pictures as check does)
EXTRA_SETTINGS = {"fetch": ("min_side", "max_pixels")}
SHARD_ALIASES = {"shard_part": "--part", "shard_max_side": "--max-side"}
DATA_HELP = "folder of class folders, split folders, a CSV manifest or IDX files"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """One line, like every other error (argparse would add the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _specs(command: str) -> list[tuple[str, list]]:
    """(section, its fields) for every setting the command takes as a flag."""
    groups = [(section, section_fields(section)) for section in SECTIONS_FOR[command]]
    extra = EXTRA_SETTINGS.get(command, ())
    if extra:
        every = [spec for section in ("data", "system") for spec in section_fields(section)]
        groups.append(("shared", [spec for spec in every if spec.name in extra]))
    return groups


def _add_setting_flags(parser: argparse.ArgumentParser, command: str, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting; flags that are not given leave the setting to the config/defaults."""
    for section, specs in _specs(command):
        group = parser.add_argument_group(f"{section} settings")
        for spec in specs:
            if spec.name in skip:
                continue
            flag = "--" + spec.name.replace("_", "-")
            choices = spec.metadata.get("choices")
            allowed = f"one of {', '.join(choices)}; " if choices else ""
            help_text = f"{spec.metadata['help']} ({allowed}default: {spec.default})"
            if isinstance(spec.default, bool):
                group.add_argument(
                    flag,
                    dest=spec.name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            else:
                group.add_argument(
                    flag,
                    dest=spec.name,
                    type=type(spec.default),
                    default=argparse.SUPPRESS,
                    help=help_text,
                    metavar=spec.name.upper(),
                )


def overrides(args: argparse.Namespace, command: str) -> dict:
    """The setting flags given on the command line, as flat overrides."""
    names = {spec.name for _, specs in _specs(command) for spec in specs}
    return {name: value for name, value in vars(args).items() if name in names}


def _command(sub, name: str, help_text: str, **flags) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, **flags)
    parser.add_argument(
        "--events",
        metavar="FILE.jsonl",
        help="also write every event (progress, epochs, messages) as one JSON object per line",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="imgclf", description="Photos in folders -> a classifier you can trust.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = _command(sub, "check", "audit a data set: unreadable files, duplicates, leakage, class counts")
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--json", dest="json_path", help="also write the full report as JSON to this file")

    p = _command(sub, "train", "train a classifier (audit, split, train, evaluate)")
    p.add_argument("data", nargs="?", help=DATA_HELP)
    p.add_argument("--out", default="runs/run", help="run folder to create (default: runs/run)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from where it stopped (only system settings may change); "
        "auto: continue the run in --out if there is one, else start it (one command for every torchrun restart)",
    )
    p.add_argument("--config", help="JSON file of settings (flat or by section); flags override it")

    p = _command(sub, "compare", "train several models on the same split and keep the best by validation")
    p.add_argument("data", help=DATA_HELP)
    p.add_argument(
        "--models",
        required=True,
        help="comma-separated MODEL[:MODE] candidates, e.g. cnn3,cnn4,tf_efficientnet_lite0:head",
    )
    p.add_argument(
        "--per-class",
        dest="per_class_sizes",
        default="",
        help="comma-separated photos-per-class sizes to train each candidate at (plots accuracy vs N)",
    )
    p.add_argument("--out", default="runs/compare", help="folder for the runs and the leaderboard")
    p.add_argument("--config", help="JSON file of settings (flat or by section); flags override it")

    p = _command(sub, "evaluate", "evaluate a run on its test split (or on other labelled data)")
    p.add_argument("run_dir")
    p.add_argument("data", nargs="?", help="labelled data to evaluate on instead of the run's test split")
    p.add_argument("--out", help="folder for metrics.json and the reports (default: the run folder)")

    p = _command(sub, "embed", "embeddings for TensorBoard's projector, NumPy, and PCA/t-SNE maps")
    p.add_argument("run_dir")
    p.add_argument("data", nargs="?", help="labelled data to embed (default: the run's own images)")
    p.add_argument("--out", required=True, help="folder for the embedding files")

    p = _command(sub, "similar", "the training photos nearest to an image")
    p.add_argument("run_dir")
    p.add_argument("image")
    p.add_argument("--k", type=int, default=8, help="how many neighbours (default: 8)")

    p = _command(sub, "predict", "label image files with a trained model")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")

    p = _command(sub, "export", "export a trained model to ONNX (checked against PyTorch)")
    p.add_argument("run_dir")
    p.add_argument("--int8", action="store_true", help="also write a static int8 model (calibrated, checked)")
    p.add_argument("--out", help="folder for the exported bundle (default: RUN_DIR/onnx)")

    p = _command(sub, "serve", "the self-hosted service and its web page; or: serve keys create --scope S")
    p.add_argument("action", nargs="*", help="nothing to serve; 'keys create' to make an API key (printed once)")
    p.add_argument("--home", default="imgclf-home", help="folder for the database, uploads and models")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--scope", default="admin", help="keys create: admin, train or predict (default: admin)")
    p.add_argument("--name", default="", help="keys create: a note of what the key is for")
    _database_argument(p)
    p.add_argument(
        "--train-threads",
        type=int,
        default=0,
        metavar="N",
        help="threads for the trainings of the worker it runs (default: all; fewer leave cores to predictions)",
    )
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="answer HTTP only; trainings run on 'imgclf worker' machines sharing --db and --home",
    )
    p.add_argument(
        "--allow-url-uploads",
        action="store_true",
        help="let clients send photos by URL (upload and predict); only public addresses are fetched",
    )
    p.add_argument(
        "--url-allow-host",
        dest="url_allow_hosts",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="with --allow-url-uploads: a host that is not public but may be fetched (repeatable)",
    )

    p = _command(sub, "worker", "a training worker for 'imgclf serve', alone (e.g. on a GPU machine)")
    p.add_argument("--home", default="imgclf-home", help="the service's home folder, on storage shared with the API")
    _database_argument(p)
    p.add_argument(
        "--lease",
        type=float,
        default=30.0,
        help="seconds without a heartbeat after which another worker takes a job over (default: 30)",
    )

    p = _command(sub, "fetch", "build class folders from lists of image URLs (dead links and placeholders weeded out)")
    p.add_argument(
        "inputs",
        nargs="*",
        help="text files of URLs (one per class), a folder of them, CSV/TSV url,label, or ImageNet-style lists",
    )
    p.add_argument("--out", required=True, help="data folder to write (class folders + .imgclf/fetch/manifest.jsonl)")
    p.add_argument("--names", help="ImageNet words.txt: wnid<TAB>name lines, to name the classes")
    p.add_argument(
        "--placeholder",
        dest="placeholders",
        action="append",
        default=[],
        metavar="FILE",
        help="a known stand-in picture to refuse (also re-encoded or resized copies); repeatable",
    )
    p.add_argument("--retry-failed", action="store_true", help="retry the URLs whose last failure was transient")
    p.add_argument(
        "--dry-run", action="store_true", help="parse, de-duplicate and count per label and host; no network"
    )
    p.add_argument(
        "--from-img2dataset",
        metavar="DIR",
        help="instead of downloading: turn an img2dataset output (parquet + files or tar shards) into class folders",
    )
    p.add_argument("--label-column", default="label", help="--from-img2dataset: the column holding the label")
    p.add_argument("--config", help="JSON file of settings (flat or by section); flags override it")

    p = _command(sub, "shard", "write a data set as WebDataset tar shards with byte-offset indexes (timm reads them)")
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("out", help="folder for the shards (a rerun finishes a killed run there)")
    _shard_aliases(p)

    p = _command(sub, "datasets", "get public data sets (needs a network)")
    p.add_argument("action", choices=["download"])
    p.add_argument("name", choices=["fashion-mnist", "mnist"])
    p.add_argument("folder")

    p = _command(sub, "demo", "the embedded default: scikit-learn digits, check -> train -> predict")
    p.add_argument("--data", default="demo_data/digits", help="where to write the digit images")
    p.add_argument("--out", default="runs/digits", help="run folder")

    for name in SECTIONS_FOR:
        skip = ("model", "mode", "per_class") if name == "compare" else tuple(SHARD_ALIASES) if name == "shard" else ()
        _add_setting_flags(sub.choices[name], name, skip)
    return parser


def _shard_aliases(p: argparse.ArgumentParser) -> None:
    """``--part`` and ``--max-side`` as well as the settings' own names (``max_side`` is fetch's)."""
    for spec in section_fields("shard"):
        if spec.name in SHARD_ALIASES:
            flags = (SHARD_ALIASES[spec.name], "--" + spec.name.replace("_", "-"))
            help_text = f"{spec.metadata['help']} (default: {'all' if spec.default == '' else spec.default})"
            p.add_argument(*flags, dest=spec.name, type=type(spec.default), default=argparse.SUPPRESS,
                           help=help_text, metavar="I/N" if spec.name == "shard_part" else "PX")  # fmt: skip


def _database_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        metavar="URL",
        help="postgresql://USER@HOST/DATABASE shared by several API and worker machines "
        "(password in PGPASSWORD or ~/.pgpass); default: SQLite in --home",
    )
