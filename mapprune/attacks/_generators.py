"""Input-aware's mask and pattern generators: the networks, the losses and their training (the two phases
described in inputaware.py).

This is generator training with a throw-away joint classifier, not classifier training, so it has its own
short loop; the backdoored model itself is trained by :func:`mapprune.train.train`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MapPruneError
from ..models import create_model
from ..train import augment_batch
from . import _learned as L

_EPS = 1e-6


class EncoderDecoder(nn.Module):
    """Two convs at full size, two at half size, upsampling and two convs on both (a one-level U-Net).

    No batch norm: a trigger must not depend on which other images share the batch.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        w = width
        self.top = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(w, w, 3, padding=1), nn.ReLU())
        self.low = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.out = nn.Sequential(nn.Conv2d(3 * w, w, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(w, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.top(x - 0.5)
        b = F.interpolate(self.low(a), size=a.shape[-2:], mode="nearest")
        return self.out(torch.cat([a, b], 1))


class PatternGenerator(EncoderDecoder):
    """Image -> pattern in [0, 1] with the image's channels."""

    def __init__(self, channels: int, width: int):
        super().__init__(channels, channels, width)

    def forward(self, x):
        return torch.sigmoid(super().forward(x))


class MaskGenerator(EncoderDecoder):
    """Image -> 1-channel mask in [0, 1], nearly binary."""

    def __init__(self, channels: int, width: int):
        super().__init__(channels, 1, width)

    def forward(self, x):
        # A bounded pre-activation through a steep step (as the paper's threshold): values cluster at 0 and 1,
        # so the trigger replaces pixels instead of faintly blending everywhere, yet gradients still flow.
        return 0.5 + 0.5 * torch.tanh(10 * torch.tanh(super().forward(x)))


def diversity_loss(x1, x2, out1, out2) -> torch.Tensor:
    """Mean image distance over mean output distance (per-image RMS): small when different images get
    different outputs. The paper's L_div."""
    d_img = (x1 - x2).pow(2).mean(dim=(1, 2, 3)).add(_EPS).sqrt().mean()
    # eps inside the root: identical outputs (saturated masks) must not give an infinite gradient
    d_out = (out1 - out2).pow(2).mean(dim=(1, 2, 3)).add(_EPS).sqrt().mean()
    return d_img / d_out


def compose(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * (1 - mask) + pattern * mask


CLASSIFIER_LR = 1e-3  # Adam for the joint classifier: robust in a short run (the paper: SGD 0.01 for many epochs)


def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))  # the paper's generator optimiser settings


def _finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss):
        raise MapPruneError(f"inputaware {what} training diverged (loss is not finite); lower lr")


def train_generators(atk, dataset, device: torch.device, progress: bool) -> dict[str, torch.Tensor]:
    """Returns the trained generators' weights (``gen.*``, ``mask.*``) and a few ``stats.*`` scalars."""
    c, _, w = atk.image_shape
    x_all, y_all = dataset.x_train, dataset.y_train
    g = torch.Generator().manual_seed(atk.seed)
    with L.seeded(atk.seed):
        gen, mask = atk.networks()
        clf = create_model(atk.joint_model, atk.num_classes, width=atk.joint_width, in_channels=c,
                           mean=dataset.mean, std=dataset.std)
    gen.to(device).train()
    mask.to(device).train()
    clf.to(device).train()
    bar = L.progress_bar(atk.mask_steps + atk.steps, "inputaware generators", progress)
    bs = atk.batch_size

    # Phase 1: the mask generator alone, so masks differ between images and cover about mask_density.
    opt = _adam(mask.parameters(), atk.lr)
    for _ in range(atk.mask_steps):
        x1, x2 = L.batch(x_all, bs, g, device), L.batch(x_all, bs, g, device)
        m1, m2 = mask(x1), mask(x2)
        size = F.relu(m1.mean() - atk.mask_density) + F.relu(m2.mean() - atk.mask_density)
        loss = atk.lambda_div * diversity_loss(x1, x2, m1, m2) + atk.lambda_norm * size
        _finite(loss, "mask generator")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    mask.eval().requires_grad_(False)

    # Phase 2: the pattern generator with the joint classifier; the mask generator stays fixed.
    n_bd = max(1, round(atk.joint_attack_ratio * bs))
    n_cross = round(atk.joint_cross_ratio * bs)
    k = min(n_bd, n_cross)  # pairs for the diversity loss: a poisoned image and a cross image's donor
    pad = max(1, round(4 * w / 32))
    opt_g, opt_c = _adam(gen.parameters(), atk.lr), torch.optim.Adam(clf.parameters(), lr=CLASSIFIER_LR)
    correct = torch.zeros(3)
    for step in range(atk.steps):
        idx = torch.randint(0, len(x_all), (bs,), generator=g)
        x, y = x_all[idx].to(device).float().div_(255), y_all[idx].to(device)
        x2 = L.batch(x_all, bs, g, device)  # the donors of the cross triggers
        bd, cr = slice(0, n_bd), slice(n_bd, n_bd + n_cross)
        with torch.no_grad():
            m_bd, m_cr = mask(x[bd]), mask(x2[cr])
        p_bd, p_cr = gen(x[bd]), gen(x2[cr])
        inputs = torch.cat([compose(x[bd], p_bd, m_bd), compose(x[cr], p_cr, m_cr), x[n_bd + n_cross:]])
        labels = torch.cat([atk.target_labels(y[bd]), y[n_bd:]])
        # The final model is trained with crop/flip after poisoning, so the triggers must survive it here too.
        out = clf(augment_batch(inputs, pad, dataset.hflip, g))
        loss = F.cross_entropy(out, labels)
        if k:
            loss = loss + atk.lambda_div * diversity_loss(x[:k], x2[n_bd:n_bd + k], p_bd[:k], p_cr[:k])
        _finite(loss, "pattern generator")
        opt_g.zero_grad(set_to_none=True)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        opt_c.step()
        if step >= atk.steps - max(1, atk.steps // 10):  # accuracies over the last tenth of the steps
            hit = (out.detach().argmax(1) == labels).float().cpu()
            correct += torch.stack([hit[:n_bd].mean(), hit[n_bd:n_bd + n_cross].mean() if n_cross else torch.tensor(1.0),
                                    hit[n_bd + n_cross:].mean()])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    correct /= max(1, atk.steps // 10)
    with torch.no_grad():
        mask_mean = mask(L.batch(x_all, bs, g, device)).mean()
    return {**L.prefixed("gen", gen), **L.prefixed("mask", mask), "stats.bd_acc": correct[0],
            "stats.cross_acc": correct[1], "stats.clean_acc": correct[2], "stats.mask_mean": mask_mean.cpu()}
