"""The bench's figures (DIR/figures/): ASR against clean ACC per cell, the mean ASR heatmap of attacks x defenses,
and one curve per swept option."""

import io
from pathlib import Path

from ..figures import pyplot
from ..runs import atomic_write_text
from .grid import Sweep
from .tables import summarise, sweep_points, value_text


def save_figure(fig, path: Path) -> None:
    """Saves a figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_text(path, buf.getvalue())


def grid_figures(rows: list[dict], folder: Path) -> None:
    """asr_vs_acc.png (each point one attack x seed, coloured by defense) and asr_heatmap.png (mean ASR per attack
    and defense)."""
    plt = pyplot()
    folder.mkdir(exist_ok=True)
    summary = summarise(rows)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for d in defenses:
        pts = [r for r in rows if r["defense"] == d]
        ax.scatter([100 * r["acc"] for r in pts], [100 * r["asr"] for r in pts], label=d, s=18, alpha=0.8)
    ax.set_xlabel("clean ACC %")
    ax.set_ylabel("ASR %")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("each point: one attack x seed", fontsize=9)
    fig.tight_layout()
    save_figure(fig, folder / "asr_vs_acc.png")
    plt.close(fig)
    grid = [[100 * summary[(a, d)]["asr"]["mean"] if (a, d) in summary else float("nan") for d in defenses]
            for a in attacks]
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(defenses), 2.5 + 0.5 * len(attacks)))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="mean ASR %")
    fig.tight_layout()
    save_figure(fig, folder / "asr_heatmap.png")
    plt.close(fig)


def sweep_figure(rows: list[dict], sweep: Sweep, folder: Path) -> None:
    """sweep-DEFENSE-PARAM.png: ASR and clean ACC of each attack over the swept values (dotted: the entry's own)."""
    values, attacks, got = sweep_points(rows, sweep)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for a in attacks:
        pts = [(x, got[(str(v), a)]) for x, v in zip(xs, values) if (str(v), a) in got]
        if not pts:
            continue
        for ax, metric in zip(axes, ("asr", "acc")):
            ax.plot([p[0] for p in pts], [100 * p[1][metric]["mean"] for p in pts], marker="o", label=a)
    for ax, metric in zip(axes, ("ASR %", "clean ACC %")):
        ax.set_xlabel(sweep.param)
        ax.set_ylabel(metric)
        if not numeric:
            ax.set_xticks(xs, [value_text(v) for v in values])
        ax.axvline(xs[[p[1] for p in sweep.points].index(sweep.defense)], color="grey", lw=0.8, ls=":")
    axes[0].set_ylim(-3, 103)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{sweep.defense}: {sweep.param} (dotted: its own setting)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, folder / f"sweep-{sweep.defense}-{sweep.param}.png")
    plt.close(fig)
