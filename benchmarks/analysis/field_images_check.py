"""Does judging the field probes on fewer images (FMT's ``field_images``) change what the recommended recipe
does? Compares, per run and seed, a finished repair whose fields were judged on every test image
(``defense/fmt[-seedS]/result.json``, field_images 0, as before the option existed) with a detection-only run of the
current recipe (``mapprune defend fmt RUN --seed S --detect-only --opt stimulate=0``: the same probes, seed and clean
subset, fields judged on ``field_images``).

The repair is a function of what testing decides: the pruned maps (patch probe), the suspected target, and the
ordered unlearning candidates of each probe (patches, warps, smooth fields; the fields themselves follow every
image's gradient and do not change). Where all of these are equal, the fine-tune is the same computation and the
finished repair's ACC / ASR / RA stand for the current recipe; otherwise the row says what moved.

    python benchmarks/analysis/field_images_check.py runs/cifar10-badnets:0 runs/cifar10-lc:0,1,2 ...
"""
import json
import sys
from pathlib import Path

KEYS = ("maps", "warp_maps", "smooth_maps")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def field_images(result: dict) -> int:
    return result["params"].get("field_images", 0)


def compare(run: Path, seed: int) -> str:
    suffix = "" if seed == 0 else f"-seed{seed}"
    full, now = run / "defense" / f"fmt{suffix}" / "result.json", \
        run / "defense" / f"fmt-stimulate0-detect{suffix}" / "result.json"
    if not full.exists() or not now.exists():
        return f"| {run.name} | {seed} | missing: {full if not full.exists() else now} |||||"
    a, b = load(full), load(now)
    if field_images(a) != 0 or field_images(b) == 0:
        return f"| {run.name} | {seed} | not a before/after pair (field_images {field_images(a)}, {field_images(b)}) |||||"
    cells = []
    same_pruned = a["pruned"] == b["pruned"]
    same_target = a["suspected_target"]["target"] == b["suspected_target"]["target"]
    moved = []
    for key in KEYS:
        x, y = a["unlearning"].get(key, []), b["unlearning"].get(key, [])
        cells.append("same" if x == y else f"{len(set(x) & set(y))} of {len(x)} shared" +
                     (", same set" if set(x) == set(y) else ""))
        if x != y:
            moved.append(key)
    for probe in ("warp", "smooth"):
        ta = a["unlearning"].get(f"{probe}_suspected_target", {}).get("target")
        tb = b["unlearning"].get(f"{probe}_suspected_target", {}).get("target")
        cells.append(f"{ta}" if ta == tb else f"{ta} -> {tb}")
        if ta != tb:
            moved.append(f"{probe} target")
    identical = same_pruned and same_target and not moved
    after = a["after"]
    return (f"| {run.name} | {seed} | {'yes' if same_pruned else 'no'} | {'yes' if same_target else 'no'} | "
            + " | ".join(cells) + f" | {'**identical**' if identical else 'differs'} | "
            f"{100 * after['acc']:.2f} / {100 * after['asr']:.2f} / {100 * after['ra']:.2f} |")


def main() -> None:
    print("| model | seed | pruned maps equal | suspected target equal | patch candidates | warp candidates | "
          "smooth candidates | warp target | smooth target | testing decides the same | finished repair "
          "(fields on all images) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        run, seeds = arg.split(":")
        for seed in seeds.split(","):
            print(compare(Path(run), int(seed)))


if __name__ == "__main__":
    main()
