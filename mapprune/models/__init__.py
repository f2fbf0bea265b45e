"""Architectures and the one model registry: ``create_model(name, num_classes, **kw)``.

Every model returned by :func:`create_model` is wrapped in :class:`Normalized`, so it takes [0, 1] pixels.
"""

from functools import partial

from ..errors import MapPruneError
from ..registry import Registry
from .conv_guard import guard_strided_pointwise_convs
from .preactresnet import PreActResNet18
from .resnet import ResNet18
from .smallcnn import SmallCNN
from .torchvision_bb import VGGTV, ResNetTV
from .vgg import VGG16BN
from .vit import ViT
from .wrapper import Normalized

# name -> factory(num_classes=, in_channels=, width=) returning an nn.Module that takes normalised pixels. A model of
# one's own joins with ``MODELS.register(name, factory)`` or the ``mapprune.models`` entry-point group.
MODELS = Registry("model", "mapprune.models", decorator="MODELS.register")
for _name, _factory in {
    "preactresnet18": PreActResNet18,
    "preactresnet18-bb": partial(PreActResNet18, final_bn=False),  # BackdoorBench's layout (import-backdoorbench)
    "resnet18": ResNet18,
    "vgg16_bn": VGG16BN,
    "smallcnn": SmallCNN,
    "vit": ViT,  # a small vision transformer (embedding dim 2 x width): FMT on Linear layers
    # torchvision's ImageNet layouts, as BackdoorBench trains them on CIFAR (import-backdoorbench)
    "resnet18-bb": partial(ResNetTV, 18),
    "resnet34-bb": partial(ResNetTV, 34),
    "resnet50-bb": partial(ResNetTV, 50),
    "vgg11-bb": partial(VGGTV, 11, False),
    "vgg16-bb": partial(VGGTV, 16, False),
    "vgg19-bb": partial(VGGTV, 19, False),
    "vgg19_bn-bb": partial(VGGTV, 19, True),
}.items():
    MODELS.register(_name, _factory)
del _name, _factory


def create_model(
    name: str,
    num_classes: int,
    *,
    width: int | None = None,
    in_channels: int = 3,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
) -> Normalized:
    """Build a registered architecture, wrapped so that it takes [0, 1] pixels.

    ``width`` is the first stage's channel count (64 = the paper's PreActResNet18; the ViT's embedding dimension
    is 2 x width); None keeps each architecture's default.
    """
    factory = MODELS.get(name)
    kw = {"num_classes": num_classes, "in_channels": in_channels}
    if width is not None:
        if width < 1:
            raise MapPruneError(f"--width must be a positive integer, got {width}")
        kw["width"] = width
    # Built through the guard: a few tiny strided 1x1 convolutions crash PyTorch's CPU kernel (conv_guard.py).
    return guard_strided_pointwise_convs(Normalized(factory(**kw), mean[:in_channels], std[:in_channels]))


__all__ = ["MODELS", "Normalized", "create_model"]
