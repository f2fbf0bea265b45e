"""Tables and figures."""

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
