"""Tables and figures."""

import re
import statistics
from pathlib import Path

import torch


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table; floats in [0, 1] under metric columns are shown as percentages."""
    def cell(k, v):
        if isinstance(v, float) and k in ("acc", "asr", "ra", "der", "ACC", "ASR", "RA", "DER"):
            return f"{100 * v:.2f}"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v)

    cells = [[cell(c, r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, img: torch.Tensor):
    img = img.permute(1, 2, 0).numpy()
    ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
              vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_samples(path: Path, clean: torch.Tensor, triggered: torch.Tensor, titles=("clean", "triggered")) -> None:
    """Rows of clean images over the same images with the trigger (uint8 tensors, N x C x H x W)."""
    plt = _plt()
    n = len(clean)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.9), squeeze=False)
    for i in range(n):
        _show(axes[0, i], clean[i])
        _show(axes[1, i], triggered[i])
    axes[0, 0].set_ylabel(titles[0])
    axes[1, 0].set_ylabel(titles[1])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_defense_figures(folder: Path, manifest: dict, report: dict, result, data, defense) -> None:
    """Before/after bars for every defense; per-layer score plots where a defense scored channels; then the
    defense's own figures (its ``figures`` hook)."""
    plt = _plt()
    folder = Path(folder)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    keys = ["acc", "asr", "ra"]
    pos = torch.arange(len(keys)).float()
    ax.bar(pos - 0.2, [100 * report["before"][k] for k in keys], 0.4, label="before")
    ax.bar(pos + 0.2, [100 * report["after"][k] for k in keys], 0.4, label=f"after {report['name']}")
    ax.set_xticks(pos.tolist(), [k.upper() for k in keys])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "metrics.png", dpi=100)
    plt.close(fig)
    if result.scores:
        save_channel_scores(folder / "scores.png", result.scores, result.pruned,
                            getattr(defense, "score_label", "per-channel score"))
    draw = DEFENSE_FIGURES.get(defense.name)
    if draw is not None:
        draw(folder, result, data, defense)


def save_nc_triggers(folder: Path, result, data, defense) -> None:
    """triggers.png: every class's reversed mask and its stamp on a clean image, flagged classes in red."""
    from .defenses.nc import ReversedTriggers

    plt = _plt()
    mask, pattern = result.tensors["mask"], result.tensors["pattern"]
    det = result.extra["detection"]
    k = len(mask)
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3), squeeze=False)
    x0 = data.x[0:1].float() / 255
    for c in range(k):
        stamped = ReversedTriggers(mask[c:c + 1], pattern[c:c + 1]).stamp(x0, torch.zeros(1, dtype=torch.long))
        axes[0, c].imshow(mask[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        img = stamped[0].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[1, c].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        color = "red" if c in det["flagged"] else "black"
        axes[0, c].set_title(f"{c}: |m|={det['norms'][c]:.1f}", fontsize=7, color=color)
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"NC reversed triggers (mask, stamped); anomaly index {det['anomaly_index']:.2f}, "
                 f"flagged {det['flagged'] or 'none'}", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "triggers.png", dpi=100)
    plt.close(fig)


def save_fmt_adversarial(folder: Path, result, data, defense) -> None:
    """adversarial.png: the inputs FMT made for the six lowest-scoring maps, on the model as it was tested."""
    from .probes import random_start

    if result.original is None:
        return
    flat = sorted((float(s), name, c) for name, sc in result.scores.items() for c, s in enumerate(sc.tolist()))
    xt, _ = defense.test_images(data.x, data.y)
    xt = xt[:1].float() / 255
    save_adversarial(Path(folder) / "adversarial.png", result.original, xt,
                     random_start(xt, defense.alpha, defense.seed), flat[:6], defense.eps, defense.objective)


def save_channel_scores(path: Path, scores: dict, pruned: dict, label: str) -> None:
    """One panel per layer: its channels' scores sorted, pruned ones in red."""
    plt = _plt()
    names = list(scores)
    cols = 5
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        s = torch.as_tensor(scores[name]).float()
        order = torch.argsort(s, stable=True)
        cut = set(pruned.get(name, []))
        colors = ["tab:red" if int(c) in cut else "tab:blue" for c in order]
        ax.scatter(range(len(s)), s[order].tolist(), c=colors, s=6)
        ax.set_title(f"{name} ({len(cut)} pruned)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{label}, channels sorted; red = pruned", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_adversarial(path, model, xt, x0, worst: list, eps: float, objective: str) -> None:
    """The inputs FMT made for the lowest-scoring maps ``worst`` [(score, name, channel)] on the first test
    image, next to the clean image. ``model`` is the model as it was tested."""
    from .probes import adversarial_for_map

    plt = _plt()
    modules = dict(model.named_modules())
    fig, axes = plt.subplots(1, len(worst) + 1, figsize=(1.6 * (len(worst) + 1), 2.0), squeeze=False)
    _show(axes[0, 0], (xt[0] * 255).to(torch.uint8))
    axes[0, 0].set_title("clean", fontsize=7)
    for p in model.parameters():
        p.requires_grad_(False)
    for ax, (s, name, c) in zip(axes[0, 1:], worst):
        adv = adversarial_for_map(model.eval(), modules[name], xt, x0, c, eps, objective)
        _show(ax, (adv[0] * 255).round().to(torch.uint8))
        ax.set_title(f"{name}[{c}]\nacc {100 * s:.0f}%", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# The figures a defense's own result calls for, beyond the before/after bars and the channel scores.
DEFENSE_FIGURES = {"nc": save_nc_triggers, "fmt": save_fmt_adversarial}


def collect_rows(runs) -> list[dict]:
    """One row per run folder (the undefended model) and per defense result inside it. A damaged result.json is
    left out with a :class:`MapPruneWarning` naming it, so one bad file does not hide every other row."""
    import warnings

    from .errors import MapPruneError, MapPruneWarning
    from .runs import read_manifest, read_result

    rows = []
    for run in runs:
        run = Path(run)
        m = read_manifest(run)
        base = {"run": run.name, "attack": m["attack"]["name"], "dataset": m["dataset"]["name"]}
        t = m["timings"]
        # train_s is this process's training (with its evaluations); a resumed run's earlier pieces are only in
        # train_epochs_s (epochs without evaluations), so the larger of the two is the run's training time. An
        # imported run trained elsewhere has only its import's total_s.
        rows.append({**base, "defense": "none", **m["metrics"], "der": None, "pruned": 0,
                     "wall_s": max(t.get("train_s", t.get("total_s", 0.0)), t.get("train_epochs_s", 0.0)),
                     "seed": None, "recipe": None, "suspected_target": None, "stimulated_target": None})
        for res in sorted((run / "defense").glob("*/result.json")):
            try:
                r = read_result(res.parent)
            except MapPruneError as e:
                warnings.warn(f"left out of the report: {e}", MapPruneWarning, stacklevel=2)
                continue
            rows.append({**base, "defense": r["name"], **r["after"], "der": r["der"], "pruned": r["num_pruned"],
                         "wall_s": r["wall_s"], "seed": r["clean_subset"]["seed"], "recipe": r.get("recipe"),
                         "suspected_target": r.get("suspected_target"),
                         "stimulated_target": r.get("stimulated_target")})
    return rows


def seed_summary(rows: list[dict]) -> list[dict]:
    """Groups the rows of one defense variant run with several seeds (folders NAME and NAME-seedN).

    Each group holds the seeds, and the mean, sample standard deviation (None for one seed), min and max of
    ACC, ASR and RA; groups keep the order in which their first row appears.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        variant = r["defense"]
        if r["seed"]:
            variant = re.sub(rf"-seed{r['seed']}$", "", variant)
        groups.setdefault((r["run"], r["attack"], r["dataset"], variant), []).append(r)
    out = []
    for (run, attack, dataset, variant), members in groups.items():
        g = {"run": run, "attack": attack, "dataset": dataset, "defense": variant,
             "seeds": [m["seed"] for m in members]}
        for k in ("acc", "asr", "ra"):
            v = [m[k] for m in members]
            g[k] = {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None,
                    "min": min(v), "max": max(v)}
        out.append(g)
    return out


def markdown_seed_table(groups: list[dict]) -> str:
    """Mean +- sample sd over seeds, in percent; ASR with its range."""
    def pm(s):
        return f"{100 * s['mean']:.2f}" + ("" if s["sd"] is None else f" ± {100 * s['sd']:.2f}")

    lines = ["| run | attack | defense | seeds | ACC % | ASR % | ASR range % | RA % |", "|" + "---|" * 8]
    for g in groups:
        seeds = ", ".join("-" if s is None else str(s) for s in g["seeds"])
        spread = "" if len(g["seeds"]) < 2 else f"{100 * g['asr']['min']:.2f}-{100 * g['asr']['max']:.2f}"
        lines.append(f"| {g['run']} | {g['attack']} | {g['defense']} | {seeds} | {pm(g['acc'])} | {pm(g['asr'])} | "
                     f"{spread} | {pm(g['ra'])} |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    head = ("| run | attack | defense | recipe | ACC % | ASR % | RA % | DER % | maps pruned | suspected target "
            "(anomaly) | stimulated target (anomaly) | wall s |")
    lines = [head, "|" + "---|" * 12]

    def target(t):
        return "" if not t else f"{t['target']} ({t['anomaly_index']:.1f})"

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    for r in rows:
        der = "" if r["der"] is None else f"{100 * r['der']:.2f}"
        lines.append(f"| {r['run']} | {r['attack']} | {r['defense']} | {r.get('recipe') or ''} | {pct(r['acc'])} | "
                     f"{pct(r['asr'])} | {pct(r['ra'])} | {der} | {r['pruned']} | "
                     f"{target(r.get('suspected_target'))} | {target(r.get('stimulated_target'))} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def comparison_table(groups: list[dict], defenses: list[str] | None = None) -> str:
    """The paper's layout from :func:`seed_summary` groups: one row per run (attack), one column per defense
    variant, each cell ACC / ASR / RA in % (means over seeds; the seed count in brackets when more than one),
    then the mean over the runs that have every listed defense."""
    runs = list(dict.fromkeys((g["run"], g["attack"]) for g in groups))
    present = list(dict.fromkeys(g["defense"] for g in groups))
    if defenses is None:
        first = [d for d in ("none", "ft", "fmt") if d in present]
        defenses = first + sorted(d for d in present if d not in first)
    cell = {(g["run"], g["defense"]): g for g in groups}
    lines = ["| attack (run) | " + " | ".join(defenses) + " |", "|" + "---|" * (len(defenses) + 1),
             "| | " + " | ".join(["ACC / ASR / RA"] * len(defenses)) + " |"]

    def fmt(g):
        n = len(g["seeds"])
        return (f"{100 * g['acc']['mean']:.1f} / **{100 * g['asr']['mean']:.1f}** / {100 * g['ra']['mean']:.1f}"
                + (f" ({n})" if n > 1 else ""))
    for run, attack in runs:
        cells = [fmt(cell[(run, d)]) if (run, d) in cell else "-" for d in defenses]
        lines.append(f"| {attack} ({run}) | " + " | ".join(cells) + " |")
    complete = [(r, a) for r, a in runs if all((r, d) in cell for d in defenses)]
    if len(complete) > 1:
        means = []
        for d in defenses:
            gs = [cell[(r, d)] for r, _ in complete]
            means.append(" / ".join(f"{100 * statistics.fmean(g[k]['mean'] for g in gs):.1f}"
                                    for k in ("acc", "asr", "ra")))
        lines.append(f"| mean of {len(complete)} | " + " | ".join(means) + " |")
    return "\n".join(lines)
