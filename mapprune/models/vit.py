"""A small vision transformer, trainable on a CPU, for FMT beyond convolutions.

patch embedding (Conv2d, kernel = stride = ``patch``) + learned positional embedding -> ``depth`` pre-norm
encoder blocks (LayerNorm -> multi-head self-attention -> residual; LayerNorm -> MLP -> residual) -> final
LayerNorm -> mean over the tokens -> linear head. Mean pooling, no class token: every token is a patch, so a
Linear layer's "feature map" (one output channel over all tokens) has no special position in it, and the head
reads a pooled (N, dim) vector as the CNNs' heads do.

Every projection is its own ``nn.Linear`` (``attn.q``, ``attn.k``, ``attn.v``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2``), so each is addressable by module name for testing and pruning; attention is written out with
matmul and softmax (no fused kernel), which ``vmap`` can batch.

``width`` follows the other models' convention (the first stage's channel count of a ResNet): the embedding
dimension is ``2 * width``, so the default width 64 (the paper preset's) gives dim 128, the CPU preset's 16
gives 32. The heads are ``heads`` (4) where they divide the dimension, else their greatest common divisor
with it. Depth 4, MLP ratio 2.

The model takes any image size, as the CNNs (with their global pooling) do. Patches are ``patch`` (4) pixels;
an image smaller than ``min_grid`` (4) patches a side is first upsampled (nearest, by an integer factor), which
is exactly a smaller patch: 8x8 digits get 2x2-pixel patches, a 4x4 token grid. The positional embedding is
learned on the 8x8 grid of a 32x32 image and resized bilinearly to other grids (28x28 digits: 7x7 tokens).
Sizes that are not a multiple of the patch drop their last rows and columns, as a strided conv does.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_GRID = 8  # tokens per side of a 32x32 image at patch 4: the positional embedding's own grid


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm encoder block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, round(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0, patch: int = 4, min_grid: int = 4):
        super().__init__()
        dim = 2 * width
        self.patch, self.min_grid = patch, min_grid
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, dim, REFERENCE_GRID, REFERENCE_GRID) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, math.gcd(dim, heads), mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)  # registered last: the classifier head is the last nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = min(x.shape[-2:])
        if side < self.min_grid * self.patch:
            x = F.interpolate(x, scale_factor=math.ceil(self.min_grid * self.patch / side), mode="nearest")
        x = self.embed(x)  # (N, dim, h, w)
        pos = self.pos
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        return self.head(self.norm(self.blocks(x)).mean(1))
