"""Attacks: one file each, one registry. ``create_attack(name, image_shape, num_classes, **kw)``.

A user's own attack joins the registry with the :func:`register_attack` decorator (or, from an installed package,
through the ``mapprune.attacks`` entry-point group), and its runs then reload by name like the built-in ones.
"""

from ..errors import MapPruneError, unknown_name
from .adaptive import DistributedAttack, FMTEvasiveAttack
from .badnets import BadNets
from .base import Attack
from .blended import Blended
from .inputaware import InputAware
from .lc import LabelConsistent
from .lowfreq import LowFrequency
from .multi import MultiAttack
from .patch import PatchAttack
from .random_patch import RandomPatch
from .sig import SIG
from .ssba import SSBA
from .wanet import WaNet

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (BadNets, Blended, WaNet, LowFrequency, SSBA, InputAware, SIG, LabelConsistent,
                              PatchAttack, RandomPatch, MultiAttack, DistributedAttack,
                              FMTEvasiveAttack)
}
_plugins_loaded = False


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: adds an :class:`Attack` subclass to the registry under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)) or cls.name in ("", "attack"):
        raise MapPruneError(f"register_attack takes an Attack subclass with its own name, got {cls!r}")
    if ATTACKS.get(cls.name, cls) is not cls:
        raise MapPruneError(f"an attack named {cls.name!r} is registered already ({ATTACKS[cls.name].__module__}); "
                            "give yours another name")
    ATTACKS[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Registers the attacks installed packages declare under the ``mapprune.attacks`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="mapprune.attacks"):
        try:
            register_attack(ep.load())
        except Exception as e:  # a broken plugin names itself instead of breaking every command
            raise MapPruneError(f"the attack plugin {ep.name!r} ({ep.value}) failed to load: {e}") from None


def attack_class(name: str) -> type[Attack]:
    if name not in ATTACKS:
        load_plugins()
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    return ATTACKS[name]


def create_attack(name: str, image_shape, num_classes: int, **kw) -> Attack:
    """The attack ``name`` (built-in, registered with :func:`register_attack`, or from an installed package's
    ``mapprune.attacks`` entry point) for images of ``image_shape`` (C, H, W) and ``num_classes`` classes; ``kw``
    are its options: ``target``, ``poison_ratio``, ``all_to_all`` and the attack's own. An unknown name is refused,
    naming the valid ones."""
    return attack_class(name)(image_shape, num_classes, **kw)


__all__ = ["ATTACKS", "Attack", "PatchAttack", "attack_class", "create_attack", "load_plugins", "register_attack"]
