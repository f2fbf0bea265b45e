"""A guard against a PyTorch CPU bug in strided 1x1 convolutions with few input channels.

On an AMD EPYC with AVX2 only (PyTorch 2.13.0, CPU build; the AVX-512 machines the project was also measured on never
showed it), oneDNN's weight gradient of a 1x1 convolution with stride 2 and 2 to 7 input channels, when its input or
weight is channels_last (the layout mapprune trains in), writes outside its buffers: the process dies with "double
free or corruption", a segmentation fault or a bus error, or goes on with a corrupted heap. The same convolution in
the standard layout is correct. A ResNet of width 4 (the tests' models, or a user's `--width 4`) has such a
shortcut (4 -> 8 channels); from width 8 up none has. So every model mapprune builds routes those few
convolutions through the standard layout; at that size the copies cost nothing.
"""

import torch
from torch import nn

# The largest in_channels for which the bug was reproduced was 7; 8, 9, 12, 16, 24 ran clean.
MAX_GUARDED_IN_CHANNELS = 7


class StandardLayoutConv2d(nn.Conv2d):
    """An nn.Conv2d that feeds the CPU kernel its input and weight in the standard (NCHW) layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        # clone, not contiguous(): a 1x1 kernel's channels_last strides count as contiguous, and the kernel picks
        # its layout from the strides.
        return self._conv_forward(x.contiguous(), self.weight.clone(memory_format=torch.contiguous_format),
                                  self.bias)


def needs_guard(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride != (1, 1)
            and m.in_channels <= MAX_GUARDED_IN_CHANNELS)


def guard_strided_pointwise_convs(model: nn.Module) -> nn.Module:
    """Switches, in place, every Conv2d that can hit the bug to :class:`StandardLayoutConv2d` (same parameters,
    same state_dict, still an nn.Conv2d) and returns ``model``."""
    for m in model.modules():
        if needs_guard(m):
            m.__class__ = StandardLayoutConv2d
    return model
