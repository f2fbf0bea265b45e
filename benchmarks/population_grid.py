"""Writes the bench grid of a calibration population: backdoored models whose triggers are drawn at random from
families, and clean models of the same architectures, for calibrating and testing `mapprune scan`.

    python benchmarks/population_grid.py --out benchmarks/grids/cifar10-population.toml
    mapprune bench benchmarks/grids/cifar10-population.toml --out bench/population --data-dir ../shared/data \
        --jobs 2 --threads 1

Everything is drawn from ``--seed``, so the same arguments write the same grid. Families (``--backdoored`` models
split among them in the proportions of ``FAMILIES``): ``patch`` (random-patch: size, shape, colours, place or a
random place per image), ``blend`` (a random pattern, alpha 0.08-0.25), ``warp`` (WaNet with a random field,
k and s), ``sig`` (clean-label sinusoid, random amplitude and frequency), ``ssba`` and ``inputaware``
(sample-specific, learned), ``lowfreq`` (a learned universal perturbation), ``lc`` (clean-label, adversarial
images with a patch). Every backdoored model draws its target, its poison ratio (1% to 10%, log-uniform),
all-to-all (patch, blend and warp, one in five), its architecture and its training seed. The clean models are
``badnets`` at poison ratio 0, as many per architecture as the population allows. Models are listed cheap
families first, architectures interleaved, so a partly trained population is already varied; the learned
families come last (they build a shared resource first).
"""

import argparse
import math
import random
from pathlib import Path

ARCHITECTURES = ("preactresnet18", "vgg16_bn", "resnet18")
# family: share of the backdoored models
FAMILIES = {"patch": 14, "blend": 8, "warp": 6, "sig": 4, "ssba": 3, "inputaware": 2, "lowfreq": 2, "lc": 1}
DIRTY_LABEL = ("patch", "blend", "warp", "ssba", "inputaware", "lowfreq")
LEARNED = ("ssba", "inputaware", "lowfreq", "lc")


def _family_counts(total: int) -> dict[str, int]:
    weight = sum(FAMILIES.values())
    counts = {f: math.floor(total * w / weight) for f, w in FAMILIES.items()}
    for f in sorted(FAMILIES, key=lambda f: -FAMILIES[f]):  # the remainder to the largest families
        if sum(counts.values()) >= total:
            break
        counts[f] += 1
    return counts


def _opts(family: str, rng: random.Random) -> tuple[str, dict]:
    if family == "patch":
        return "random-patch", {"trigger_seed": rng.randrange(10**6)}
    if family == "blend":
        return "blended", {"pattern_seed": rng.randrange(10**6), "alpha": round(rng.uniform(0.08, 0.25), 3)}
    if family == "warp":
        return "wanet", {"field_seed": rng.randrange(10**6), "k": rng.choice([4, 6, 8]),
                         "s": round(rng.uniform(0.5, 1.0), 2)}
    if family == "sig":
        return "sig", {"delta": rng.choice([20, 30, 40]), "frequency": rng.choice([4, 6, 8, 10])}
    if family == "ssba":
        return "ssba", {"secret_seed": rng.randrange(10**6)}
    if family == "inputaware":
        return "inputaware", {}
    if family == "lowfreq":
        return "lowfreq", {}
    return "lc", {}


def make_grid(*, seed: int, backdoored: int, clean: int, dataset: str, num_classes: int, preset: str,
              defenses: tuple[str, ...] = (), ratios: tuple[float, float] = (0.01, 0.10), grid_name: str = "") -> str:
    rng = random.Random(seed)
    entries = []
    counts = _family_counts(backdoored)
    order = [f for f in FAMILIES for _ in range(counts[f])]
    cheap = [f for f in order if f not in LEARNED]
    rng.shuffle(cheap)
    learned = [f for f in order if f in LEARNED]
    for i, family in enumerate(cheap + learned):
        name, opts = _opts(family, rng)
        clean_label = family in ("sig", "lc")
        all_to_all = family in ("patch", "blend", "warp") and rng.random() < 0.2
        ratio = math.exp(rng.uniform(math.log(ratios[0]), math.log(ratios[1])))
        if clean_label:  # a clean-label attack poisons target images only: up to 1/num_classes of the set
            ratio = min(ratio, 0.8 / num_classes)
        entries.append({"label": f"{family}-{i:02d}", "name": name, "opts": opts, "target": rng.randrange(num_classes),
                        "all_to_all": all_to_all, "poison_ratio": round(ratio, 4),
                        "model": ARCHITECTURES[i % len(ARCHITECTURES)], "train_seed": rng.randrange(1000)})
    for i in range(clean):
        entries.append({"label": f"clean-{i:02d}", "name": "badnets", "opts": {}, "target": 0, "all_to_all": False,
                        "poison_ratio": 0.0, "model": ARCHITECTURES[i % len(ARCHITECTURES)],
                        "train_seed": rng.randrange(1000)})
    # Clean and backdoored models interleaved, learned families still last, so any prefix holds both kinds.
    learned_entries = [e for e in entries if e["label"].split("-")[0] in LEARNED]
    rest = [e for e in entries if e not in learned_entries]
    backdoor_rest = [e for e in rest if not e["label"].startswith("clean")]
    clean_entries = [e for e in rest if e["label"].startswith("clean")]
    mixed = []
    while backdoor_rest or clean_entries:
        mixed += backdoor_rest[:2] + clean_entries[:1]
        backdoor_rest, clean_entries = backdoor_rest[2:], clean_entries[1:]
    grid_name = grid_name or f"{dataset}-population"
    folder = "bench/" + grid_name.removeprefix(f"{dataset}-")
    lines = [
        f"# A calibration population for `mapprune scan`: {backdoored} backdoored models with triggers drawn at random",
        f"# from families, {clean} clean models; preset {preset!r}. Written by",
        f"#   python benchmarks/population_grid.py --seed {seed} --backdoored {backdoored} --clean {clean} "
        f"--dataset {dataset} --preset {preset}" + "".join(f" --defense {d}" for d in defenses)
        + ("" if ratios == (0.01, 0.10) else f" --ratios {ratios[0]:g} {ratios[1]:g}")
        + ("" if grid_name == f"{dataset}-population" else f" --name {grid_name}"),
        "# Train it (resumable; each model is an ordinary run folder with its trigger and poison indices):",
        f"#   mapprune bench THIS_FILE --out {folder} --data-dir ../shared/data --jobs 2 --threads 1",
        *([f"# With the defenses {', '.join(defenses)} on every model: the same models (same cell keys), so in the",
           "# population's own folder only the defenses are computed:",
           f"#   mapprune bench THIS_FILE --out {folder} --update --data-dir ../shared/data --jobs 2 --threads 1"]
          if defenses else []),
        f'name = "{grid_name}"',
        f'dataset = "{dataset}"',
        f'preset = "{preset}"',
        "seeds = [0]",
        "",
    ]
    for e in mixed + learned_entries:
        opts = ", ".join(f"{k} = {_toml(v)}" for k, v in e["opts"].items())
        lines += ["[[attack]]", f'label = "{e["label"]}"', f'name = "{e["name"]}"', f"opts = {{{opts}}}",
                  f"target = {e['target']}", f"all_to_all = {_toml(e['all_to_all'])}",
                  f"poison_ratio = {e['poison_ratio']}", f"train_seed = {e['train_seed']}",
                  f'model = {{model = "{e["model"]}"}}', ""]
    for d in defenses:
        lines += ["[[defense]]", f'name = "{d}"', ""]
    return "\n".join(lines)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the grid file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backdoored", type=int, default=40)
    p.add_argument("--clean", type=int, default=20)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--preset", default="population")
    p.add_argument("--ratios", type=float, nargs=2, default=(0.01, 0.10), metavar=("LOW", "HIGH"),
                   help="the poison ratios' range, drawn log-uniform (default 0.01 0.10)")
    p.add_argument("--name", default="", help="the grid's name (default DATASET-population)")
    p.add_argument("--defense", action="append", default=[], metavar="NAME",
                   help="a defense run on every model (repeatable); the models are those of the grid without it")
    a = p.parse_args(argv)
    if not 0 < a.ratios[0] <= a.ratios[1] < 1:
        p.error("--ratios LOW HIGH: poison ratios with 0 < LOW <= HIGH < 1")
    if a.backdoored < 0 or a.clean < 0 or a.backdoored + a.clean == 0:
        p.error("--backdoored and --clean are counts of models, not negative, not both zero")
    a.out.write_text(make_grid(seed=a.seed, backdoored=a.backdoored, clean=a.clean, dataset=a.dataset,
                               num_classes=a.num_classes, preset=a.preset, defenses=tuple(a.defense),
                               ratios=tuple(a.ratios), grid_name=a.name))
    print(f"wrote {a.out}: {a.backdoored} backdoored and {a.clean} clean models")


if __name__ == "__main__":
    main()
