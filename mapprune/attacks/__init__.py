"""Attacks: one file each, one registry. ``create_attack(name, image_shape, num_classes, **kw)``.

A user's own attack joins the registry with the :func:`register_attack` decorator (or, from an installed package,
through the ``mapprune.attacks`` entry-point group), and its runs then reload by name like the built-in ones.
"""

from ..registry import Registry
from .adap import AdapBlend, AdapPatch
from .adaptive import DistributedAttack, FMTEvasiveAttack
from .badnets import BadNets
from .base import Attack
from .blended import Blended
from .bpp import Bpp
from .bypass import Bypass
from .inputaware import InputAware
from .lc import LabelConsistent
from .lowfreq import LowFrequency
from .multi import MultiAttack
from .patch import PatchAttack
from .random_patch import RandomPatch
from .sig import SIG
from .ssba import SSBA
from .tact import TaCT
from .wanet import WaNet

ATTACKS = Registry("attack", "mapprune.attacks", base=Attack, decorator="register_attack")
register_attack = ATTACKS.register  # class decorator: adds an Attack subclass under its ``name``

for _cls in (BadNets, Blended, WaNet, LowFrequency, SSBA, InputAware, SIG, LabelConsistent, PatchAttack, RandomPatch,
             MultiAttack, DistributedAttack, FMTEvasiveAttack, TaCT, AdapBlend, AdapPatch, Bpp, Bypass):
    register_attack(_cls)
del _cls


def load_plugins() -> None:
    """Registers the attacks installed packages declare under the ``mapprune.attacks`` entry-point group (once)."""
    ATTACKS.load_plugins()


def attack_class(name: str) -> type[Attack]:
    """The registered attack class ``name``; an unknown name is refused, naming the valid ones."""
    return ATTACKS.get(name)


def create_attack(name: str, image_shape, num_classes: int, **kw) -> Attack:
    """The attack ``name`` (built-in, registered with :func:`register_attack`, or from an installed package's
    ``mapprune.attacks`` entry point) for images of ``image_shape`` (C, H, W) and ``num_classes`` classes; ``kw``
    are its options: ``target``, ``poison_ratio``, ``all_to_all`` and the attack's own. An unknown name is refused,
    naming the valid ones."""
    return ATTACKS.create(name, image_shape, num_classes, **kw)


__all__ = ["ATTACKS", "Attack", "PatchAttack", "attack_class", "create_attack", "load_plugins", "register_attack"]
