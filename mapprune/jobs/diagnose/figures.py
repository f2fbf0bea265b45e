"""The diagnosis's figures: pruning curves per ordering, and each scorer against the causal effect."""

from pathlib import Path

from ...figures import pyplot


def save_diagnose_figures(folder: Path, report: dict, flat: dict) -> None:
    """curves.png: ASR(k) and ACC(k) per ordering; scores_vs_truth.png: each scorer against the causal effect."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, res in report["orderings"].items():
        ks = [c["k"] for c in res["curve"]]
        style = "--" if key.startswith(("oracle", "random")) else "-"
        a1.plot(ks, [100 * c["asr"] for c in res["curve"]], style, marker=".", label=key)
        a2.plot(ks, [100 * c["acc"] for c in res["curve"]], style, marker=".", label=key)
    for ax, what in ((a1, "ASR"), (a2, "ACC")):
        ax.axvline(report["budget"], color="grey", lw=0.8)
        ax.set_xlabel("maps pruned (no fine-tune)")
        ax.set_ylabel(f"{what} %")
        ax.set_ylim(0, 100)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=90)
    plt.close(fig)
    scorers = [k for k in flat["orderings"] if not k.startswith(("oracle", "random"))]
    if not scorers:
        return
    fig, axes = plt.subplots(1, len(scorers), figsize=(3.6 * len(scorers), 3.4), squeeze=False)
    d_asr = 100 * flat["effect"][:, 0]
    for ax, key in zip(axes[0], scorers):
        ax.scatter(flat["orderings"][key].tolist(), d_asr.tolist(), s=4, alpha=0.5)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("suspicion (within-layer z)")
        ax.set_ylabel("ASR drop when pruned alone (points)")
    fig.tight_layout()
    fig.savefig(folder / "scores_vs_truth.png", dpi=90)
    plt.close(fig)
