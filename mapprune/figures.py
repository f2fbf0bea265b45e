"""Figures of runs and defenses: a run's samples, a defense's before/after bars and channel scores, and the
figures each defense's result calls for. :func:`pyplot` is the one way every figure gets matplotlib."""

from pathlib import Path

import torch

from .defenses.nc import ReversedTriggers
from .probes import adversarial_for_map, random_start


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only; no display is needed)."""
    import matplotlib  # lazy: matplotlib (half a second) only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use('Agg'), which must come first

    return plt


def _show(ax, img: torch.Tensor):
    img = img.permute(1, 2, 0).numpy()
    ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
              vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_samples(path: Path, clean: torch.Tensor, triggered: torch.Tensor, titles=("clean", "triggered")) -> None:
    """Rows of clean images over the same images with the trigger (uint8 tensors, N x C x H x W)."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    if result.original is None:
        return
    flat = sorted((float(s), name, c) for name, sc in result.scores.items() for c, s in enumerate(sc.tolist()))
    xt, _ = defense.test_images(data.x, data.y)
    xt = xt[:1].float() / 255
    save_adversarial(Path(folder) / "adversarial.png", result.original, xt,
                     random_start(xt, defense.alpha, defense.seed), flat[:6], defense.eps, defense.objective)


def save_channel_scores(path: Path, scores: dict, pruned: dict, label: str) -> None:
    """One panel per layer: its channels' scores sorted, pruned ones in red."""
    plt = pyplot()
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
    plt = pyplot()
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
