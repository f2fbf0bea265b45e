"""Fine-tune batch transforms that stamp candidate triggers on clean images and keep their true labels: how FMT
unlearns its own candidates and NC its reversed triggers while the model fine-tunes."""

import torch


def stamping(triggers, share: float, append: bool = False):
    """A fine-tune batch transform (for :func:`mapprune.train.train`) that stamps one of ``triggers`` (anything
    with ``len()`` and ``stamp(images, which)``) on a random ``share`` of each batch and keeps the true labels:
    unlearning candidate triggers (FMT's own, NC's reversed ones) while the model fine-tunes.

    ``append``: the stamped images are copies added after the batch instead of replacing its images, so every
    clean image is still seen; the transform then also returns, for each image it gives back, the index of the
    image of the batch it was made from (the distillation's teacher sees that one)."""

    def transform(xb, yb, g):
        hit = torch.nonzero(torch.rand(len(xb), generator=g) < share).flatten()
        if len(hit) == 0:
            return (xb, yb, torch.arange(len(xb), device=xb.device)) if append else (xb, yb)
        which = torch.randint(0, len(triggers), (len(hit),), generator=g)
        hit_dev = hit.to(xb.device)
        if append:
            stamped = triggers.stamp(xb[hit_dev], which.to(xb.device))
            return (torch.cat([xb, stamped]), torch.cat([yb, yb[hit_dev]]),
                    torch.cat([torch.arange(len(xb), device=xb.device), hit_dev]))
        xb = xb.clone()
        xb[hit_dev] = triggers.stamp(xb[hit_dev], which.to(xb.device))
        return xb, yb
    return transform


def stamping_each(parts: list, share: float, append: bool = False):
    """A fine-tune batch transform like :func:`stamping`, but every candidate family (patches, warps,
    smooth fields) is stamped on its own random ``share`` of each batch, so adding a family does not thin out the
    others; the labels stay true. Replacing (the default), an image may carry candidates of several families;
    with ``append`` each family's stamped copies of the batch's own images are added after it."""
    steps = [stamping(part, share, append) for part in parts]

    def transform(xb, yb, g):
        if append:
            outs = [step(xb, yb, g) for step in steps]
            n = len(xb)
            return tuple(torch.cat([out[i] if k == 0 else out[i][n:] for k, out in enumerate(outs)])
                         for i in range(3))
        for step in steps:
            xb, yb = step(xb, yb, g)
        return xb, yb
    return transform
