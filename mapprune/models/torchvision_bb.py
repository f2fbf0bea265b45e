"""The torchvision architectures that BackdoorBench trains on CIFAR-sized images, in their exact state-dict layout,
so that BackdoorBench's checkpoints of them load unchanged (``mapprune import-backdoorbench``).

BackdoorBench builds ``resnet18/34/50`` and ``vgg11/16/19/19_bn`` with torchvision's ImageNet constructors, only
``num_classes`` changed, and feeds them 32x32 images as they are:

* ResNet: 7x7 stride-2 stem conv + BatchNorm + ReLU + 3x3 stride-2 max pooling, four stages ``layer1..4`` of
  post-activation blocks (basic blocks for 18/34, 1x1-3x3-1x1 bottlenecks with 4x expansion for 50; a stage's
  first block takes the stride on its 3x3 conv and, where the shape changes, a ``downsample`` of 1x1 conv +
  BatchNorm), global average pooling, ``fc``.
* VGG: ``features`` (3x3 convs with bias, each followed by BatchNorm for ``_bn``, then ReLU; 2x2 max pooling
  between the blocks), a 7x7 adaptive average pooling (a 32x32 image leaves 1x1, repeated 49 times), then
  ``classifier`` = Linear(49 C, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Linear(4096, classes).

``width`` is the first stage's channel count (64 = torchvision's); the VGG's hidden layers have 64 x width units
(4096 at width 64). Two deliberate departures that change nothing on BackdoorBench's inputs: the VGG pools with
``ceil_mode`` so that images smaller than 32x32 (mapprune's 8x8 digits) still run (any side that is a multiple of
32, BackdoorBench's 32, 64 and 224, gives identical results), and the ReLUs are not in place (hooks see each
module's own output).
"""

from torch import nn


class BasicBlockTV(nn.Module):
    """Two 3x3 convs with BatchNorm, added to the input (or its 1x1 ``downsample``), then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = _downsample(in_planes, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class BottleneckTV(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), each with BatchNorm; residual sum, then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = _downsample(in_planes, out, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


RESNET_DEPTHS = {18: (BasicBlockTV, (2, 2, 2, 2)), 34: (BasicBlockTV, (3, 4, 6, 3)), 50: (BottleneckTV, (3, 4, 6, 3))}


class ResNetTV(nn.Module):
    """torchvision's ImageNet ResNet (18, 34 or 50 layers) with a width multiplier."""

    def __init__(self, depth: int = 18, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        block, counts = RESNET_DEPTHS[depth]
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes_in = width
        for i, n in enumerate(counts):
            planes = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(planes_in, planes, 2 if i > 0 and j == 0 else 1))
                planes_in = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes_in, num_classes)

    def forward(self, x):
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.avgpool(out).flatten(1))


# Output channels of each conv in units of width; "M" is a 2x2 max pooling.
VGG_CONFIGS = {
    11: (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    16: (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"),
    19: (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"),
}


class VGGTV(nn.Module):
    """torchvision's ImageNet VGG (11, 16 or 19 layers, with or without BatchNorm) with a width multiplier."""

    def __init__(self, depth: int = 19, batch_norm: bool = True, num_classes: int = 10, width: int = 64,
                 in_channels: int = 3):
        super().__init__()
        layers, c = [], in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            layers.append(nn.Conv2d(c, v * width, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v * width))
            layers.append(nn.ReLU())
            c = v * width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        hidden = 64 * width
        self.classifier = nn.Sequential(
            nn.Linear(c * 49, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))
