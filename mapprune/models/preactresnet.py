"""PreActResNet18 in BackdoorBench's layout, with a width multiplier.

stem conv -> 4 stages x 2 pre-activation blocks (1x1 shortcut conv where shape changes) -> avgpool -> linear.
``width=64`` is the paper's model; ``width=16`` is the CPU preset. BackdoorBench's own PreActResNet18 has no
BatchNorm + ReLU between the last stage and the pooling: ``final_bn=False`` (registered as
``preactresnet18-bb``) is exactly that layout, so its checkpoints load unchanged.
"""

import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3, final_bn: bool = True):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.in_planes = w[0]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.layer1 = self._stage(w[0], 1)
        self.layer2 = self._stage(w[1], 2)
        self.layer3 = self._stage(w[2], 2)
        self.layer4 = self._stage(w[3], 2)
        self.final_bn = final_bn  # False: BackdoorBench's exact layout (no BatchNorm + ReLU before the pooling)
        if final_bn:
            self.bn = nn.BatchNorm2d(w[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(w[3], num_classes)

    def _stage(self, planes: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in (stride, 1):
            blocks.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.final_bn:
            out = F.relu(self.bn(out))
        return self.linear(self.avgpool(out).flatten(1))
