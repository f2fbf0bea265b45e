"""What is each defense's mean ACC / ASR / RA over a chosen set of attacks? Read from a bench's results.csv, beside a
reference's published means over the same attacks (only where the reference has every one of them).

    python benchmarks/analysis/bench_average.py bench/cifar10-cpu/results.csv --attacks badnets,blended,wanet,inputaware,lc \
        --reference benchmarks/reference/backdoorbench-cifar10.toml

Seeds are averaged within a cell first, then the cells over the attacks. A defense missing a cell on one of the
attacks is listed with the attacks it lacks and no mean, so a mean is always over the same models for every defense.
"""
import argparse

from mapprune.bench.results import read_results
from mapprune.bench.tables import means_table, summarise
from mapprune.errors import MapPruneError
from mapprune.jobs.bench import load_reference


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a bench's results.csv")
    ap.add_argument("--attacks", required=True, help="comma-separated attack labels, as in results.csv's attack column")
    ap.add_argument("--reference", help="a reference TOML (benchmarks/reference/)")
    args = ap.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    if not attacks:
        ap.error("--attacks names no attack")
    try:
        ref = load_reference(args.reference) if args.reference else None
        rows = [r for r in read_results(args.results) if r["attack"] in attacks]
    except MapPruneError as e:
        ap.error(str(e))
    unknown = [a for a in attacks if a not in {r["attack"] for r in rows}]
    if unknown:
        ap.error(f"no rows for {', '.join(unknown)} in {args.results}")
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    # the one table benchmarks/results_tables.py writes into the docs (kind "means")
    lines, means = means_table(summarise(rows), attacks, defenses, ref)
    print(f"Means over {len(attacks)} attacks ({', '.join(attacks)}); seeds averaged within a cell first.\n")
    print("\n".join(lines))
    return means


if __name__ == "__main__":
    main()
