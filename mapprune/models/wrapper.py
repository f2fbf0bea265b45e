"""Every model takes [0, 1] pixels: normalisation lives here, inside the model."""

import torch
from torch import nn


class Normalized(nn.Module):
    """Wraps a network so that it takes pixels in [0, 1] and normalises them with the dataset's mean and std.

    The inner network is kept as ``self.net`` so module names read ``net.layer1.0.conv1``.
    """

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
