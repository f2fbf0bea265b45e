"""What is each defense's mean ACC / ASR / RA over a chosen set of attacks? Read from a bench's results.csv, beside a
reference's published means over the same attacks (only where the reference has every one of them).

    python benchmarks/analysis/bench_average.py bench/cifar10-cpu/results.csv --attacks badnets,blended,wanet,inputaware,lc \
        --reference benchmarks/reference/backdoorbench-cifar10.toml

Seeds are averaged within a cell first, then the cells over the attacks. A defense missing a cell on one of the
attacks is listed with the attacks it lacks and no mean, so a mean is always over the same models for every defense.
"""
import argparse
import csv
import statistics
from pathlib import Path

from mapprune.errors import MapPruneError
from mapprune.jobs.bench import load_reference, summarise


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a bench's results.csv")
    ap.add_argument("--attacks", required=True, help="comma-separated attack labels, as in results.csv's attack column")
    ap.add_argument("--reference", help="a reference TOML (benchmarks/reference/)")
    args = ap.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    if not attacks:
        ap.error("--attacks names no attack")
    if not Path(args.results).is_file():
        ap.error(f"no results file {args.results}")
    try:
        ref = load_reference(args.reference)["cells"] if args.reference else {}
    except MapPruneError as e:
        ap.error(str(e))
    with open(args.results, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["attack"] in attacks]
    unknown = [a for a in attacks if a not in {r["attack"] for r in rows}]
    if unknown:
        ap.error(f"no rows for {', '.join(unknown)} in {args.results}")
    for r in rows:
        r.update({m: float(r[m]) for m in ("acc", "asr", "ra")})
    cells = summarise(rows)  # {(attack, defense): mean over the cell's seeds}
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    print(f"Means over {len(attacks)} attacks ({', '.join(attacks)}); seeds averaged within a cell first.\n")
    print("| defense | ACC | ASR | RA | published ACC / ASR / RA |")
    print("|---|---|---|---|---|")
    means = {}
    for d in defenses:
        missing = [a for a in attacks if (a, d) not in cells]
        published = [ref.get(a, {}).get(d) for a in attacks]
        pub = ("-" if None in published else
               " / ".join(f"{statistics.fmean(p[i] for p in published):.2f}" for i in range(3)))
        if missing:
            print(f"| {d} | missing {', '.join(missing)} | | | {pub} |")
            continue
        means[d] = {m: statistics.fmean(cells[(a, d)][m]["mean"] for a in attacks) for m in ("acc", "asr", "ra")}
        print(f"| {d} | " + " | ".join(f"{100 * v:.2f}" for v in means[d].values()) + f" | {pub} |")
    return means


if __name__ == "__main__":
    main()
