"""Attacks: one file each, one registry. ``create_attack(name, image_shape, num_classes, **kw)``."""

from ..errors import unknown_name
from .badnets import BadNets
from .base import Attack
from .blended import Blended
from .inputaware import InputAware
from .lc import LabelConsistent
from .lowfreq import LowFrequency
from .sig import SIG
from .ssba import SSBA
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (BadNets, Blended, WaNet, LowFrequency, SSBA, InputAware, SIG, LabelConsistent)
}


def create_attack(name: str, image_shape, num_classes: int, **kw) -> Attack:
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    return ATTACKS[name](image_shape, num_classes, **kw)


__all__ = ["ATTACKS", "Attack", "create_attack"]
