"""``mapprune demo``: the whole job on the embedded digits, in about a minute on a CPU."""

import tempfile
from pathlib import Path

from .backdoor import attack_run
from .report import format_table


def demo(out: Path | None = None, device=None, progress: bool = True) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(out) if out is not None else Path(tmp) / "demo-badnets"
        print(f"Backdoor a small CNN on scikit-learn's 8x8 digits with BadNets (run folder: {run}) ...")
        m = attack_run("badnets", run, dataset="digits", preset="demo", device=device, overwrite=True,
                       progress=progress)
        rows = [{"model": "backdoored", **m["metrics"], "seconds": m["timings"]["total_s"]}]
        print(format_table(rows, ["model", "acc", "asr", "ra", "seconds"]))
        return rows
