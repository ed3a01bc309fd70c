"""Issue 16's acceptance side by side in one run, on the CPU at hand: the frozen-feature floor,
the default run within its 10-minute budget, and a 3-minute budget; each run with a cold cache,
timed from the outside (everything included: start-up, scan, audit, features, training,
evaluation, reports), with the plan's own prediction beside the time it took.

  .venv/bin/python bench/budget.py ../shared/datasets/clothing-small
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from imgclf.core.machine import cpu_flags, cpu_model  # noqa: E402
from transfer import floor, run_imgclf  # noqa: E402


def main() -> None:
    data = sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/clothing-small"
    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-budget-"))
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512f", "amx", "avx2", "avx512_bf16")))
    print(f"CPU: {cpu_model()} ({', '.join(flags)})", flush=True)
    rows = {"floor": floor(data)}
    print(f"floor: {rows['floor']}", flush=True)
    for name, args in (("default", []), ("3m budget", ["--time-budget", "3m"])):
        out = work / name.replace(" ", "-")
        row = run_imgclf(data, out, args, str(work / f"cache-{out.name}"))
        plan = json.loads((out / "run.json").read_text()).get("plan", {})
        row.update(plan=plan.get("plan"), predicted_s=plan.get("predicted_s"), speeds=plan.get("speeds"))
        rows[name] = row
        print(f"{name}: {row}", flush=True)
    print("\n| run | plan | test top-1 | wall time | predicted |\n|---|---|---:|---:|---:|")
    print(
        f"| floor (frozen Lite0 fp32 + logistic regression) | | {rows['floor']['top1']:.3f} | "
        f"{rows['floor']['seconds']:.0f} s | |"
    )
    for name in ("default", "3m budget"):
        row = rows[name]
        print(f"| {name} | {row['plan']} | {row['top1']:.3f} | {row['seconds']:.0f} s | {row['predicted_s']:.0f} s |")


if __name__ == "__main__":
    main()
