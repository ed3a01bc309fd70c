"""How the package is put together: the library never prints, and the torch-free layers stay
torch-free. (import-linter checks the layers in .ci/run; ruff the style.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "imgclf"
RENDERER = SRC / "cli" / "render.py"


def test_only_the_cli_renderer_prints_or_draws_bars():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path == RENDERER:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bprint\(|tqdm|sys\.(stdout|stderr)", line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_core_the_onnx_predictor_and_the_chooser_import_no_torch():
    code = (
        "import sys, imgclf, imgclf.core.settings, imgclf.core.meta, imgclf.core.rundir, imgclf.core.events, "
        "imgclf.predictors, imgclf.runtime; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'timm')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
