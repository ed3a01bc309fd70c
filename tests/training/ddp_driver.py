"""The imgclf CLI with test hooks, for the multi-process tests (run by torchrun; never used
outside tests). Environment variables switch the hooks on:

- ``IMGCLF_TEST_STEPS_DIR``: rank 0 saves the model's state after every optimisation step there;
- ``IMGCLF_TEST_FAULT_AT``: rank 1 raises at that step of torchrun's first attempt (a crash);
- ``IMGCLF_TEST_WRITES_DIR``: each process records every file it creates, writes, renames or
  removes under ``IMGCLF_TEST_WATCH`` (Python's audit hooks see every ``open`` and ``os`` call);
- ``IMGCLF_TEST_EMPTY_STEPS``: in rank 1, the first micro-batch of these steps (1-based, comma
  separated) comes out of the loader with no readable image, as when storage fails for a moment;
- ``validate DATA OUT.npz``: instead of the CLI, the validation logits of a fixed network over
  the split's ``val`` images, gathered from every process as training does.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))


def _watch_writes(folder: str, watched: str) -> None:
    seen: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                seen.append(os.path.abspath(args[0]))
        elif event in ("os.rename", "os.mkdir", "os.remove") and isinstance(args[0], (str, os.PathLike)):
            seen.append(os.path.abspath(os.fspath(args[1] if event == "os.rename" else args[0])))

    sys.addaudithook(hook)
    atexit.register(
        lambda: Path(folder, f"rank{RANK}.json").write_text(json.dumps([p for p in seen if p.startswith(watched)]))
    )


def _hook_steps(steps_dir: str | None, fault_at: int) -> None:
    from safetensors.torch import save_file

    from imgclf.training import loop
    from imgclf.training.distributed import unwrap

    original, count = loop._optimisation_step, [0]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def step(train_step, group, progress, epoch):
        original(train_step, group, progress, epoch)
        count[0] += 1
        if steps_dir and RANK == 0:
            state = {k: v.detach().float().contiguous() for k, v in unwrap(train_step.model).state_dict().items()}
            save_file(state, os.path.join(steps_dir, f"e{epoch}-s{progress.step:04d}.safetensors"))
        if fault_at and RANK == 1 and first_attempt and count[0] == fault_at:
            raise RuntimeError("fault injected by the test")

    loop._optimisation_step = step


def _empty_micro_batches(steps: set[int]) -> None:
    from imgclf.training import loop

    original, count = loop._micro_batches, [0]

    def grouped(loader, accumulate):
        for group in original(loader, accumulate):
            count[0] += 1
            if RANK == 1 and count[0] in steps:
                group = [(None, None, []), *group[1:]]  # what collate_skip_bad gives when none loaded
            yield group

    loop._micro_batches = grouped


def _validate(data: str, out: str) -> None:
    """Validation logits of pretrained Lite0 features under a seeded random head (predictions
    spread over the classes) for ``data``'s val images, as training gathers them."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from imgclf.core.events import ignore
    from imgclf.data.dataset import ImageDataset, ShareSampler, collate_skip_bad
    from imgclf.data.sources import scan
    from imgclf.models.device import resolve_runtime
    from imgclf.models.factory import create_model, preprocessing_for
    from imgclf.training.distributed import init_distributed
    from imgclf.training.fit import gather_logits

    ranks = init_distributed()
    found = scan(data)
    classes = found.classes
    samples = [s for s in found.samples if s.split == "val"]
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", len(classes), pretrained=True).eval()
    prep = preprocessing_for(model, "tf_efficientnet_lite0", 96)
    dataset = ImageDataset(samples, [classes.index(s.label) for s in samples], prep, False)
    loader = DataLoader(
        dataset, 32, sampler=ShareSampler(len(dataset), ranks.rank, ranks.world_size), collate_fn=collate_skip_bad
    )
    gathered = gather_logits(model, loader, resolve_runtime("cpu", "fp32", "off"), prep, ranks, ignore, set())
    if gathered is not None:
        np.savez(out, logits=gathered[0].numpy(), targets=gathered[1].numpy())


def main() -> int:
    if sys.argv[1] == "validate":
        _validate(sys.argv[2], sys.argv[3])
        return 0
    if os.environ.get("IMGCLF_TEST_WRITES_DIR"):
        _watch_writes(os.environ["IMGCLF_TEST_WRITES_DIR"], os.path.abspath(os.environ["IMGCLF_TEST_WATCH"]))
    _hook_steps(os.environ.get("IMGCLF_TEST_STEPS_DIR"), int(os.environ.get("IMGCLF_TEST_FAULT_AT", "0")))
    if os.environ.get("IMGCLF_TEST_EMPTY_STEPS"):
        _empty_micro_batches({int(n) for n in os.environ["IMGCLF_TEST_EMPTY_STEPS"].split(",")})
    from imgclf.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
