"""Defenses: one file each, one registry. ``create_defense(name, **kw).repair(model, images, labels)``."""

from ..errors import MapPruneError
from ..options import check_options
from ..registry import Registry
from .anp import ANP
from .base import RUNTIME, CleanData, Defense, DefenseResult, FineTuning
from .clp import CLP
from .fmt import FMT
from .fp import FinePruning
from .fst import FST
from .ft import FineTune
from .ibau import IBAU
from .nad import NAD
from .nc import NeuralCleanse
from .rnp import RNP
from .sau import SAU

# A defense of one's own registers with ``@register_defense`` (or ``@DEFENSES.register``) where it is defined, or
# through the ``mapprune.defenses`` entry-point group of an installed package.
DEFENSES = Registry("defense", "mapprune.defenses", base=Defense, decorator="register_defense")
register_defense = DEFENSES.register
for _cls in (FMT, FineTune, FinePruning, CLP, ANP, RNP, NAD, NeuralCleanse, IBAU, SAU, FST):
    register_defense(_cls)
del _cls


def defense_class(name: str) -> type[Defense]:
    """The registered defense class ``name``; an unknown name is refused, naming the valid ones."""
    return DEFENSES.get(name)


def defense_options(name: str) -> list[str]:
    """Every hyperparameter a defense takes (its own and its base classes')."""
    return defense_class(name).option_names()


def create_defense(name: str, **kw) -> Defense:
    """The defense ``name`` with options ``kw``; an option it does not take is refused, naming the valid ones."""
    cls = defense_class(name)
    valid = cls.option_names()
    for k in kw:
        if k not in valid and k not in RUNTIME:
            raise MapPruneError(f"{name} has no option {k!r}; valid: {', '.join(sorted(valid))}")
    return cls(**check_options(cls, kw, f"the {name} defense"))


__all__ = ["ANP", "CLP", "DEFENSES", "FMT", "FST", "IBAU", "NAD", "RNP", "SAU", "CleanData", "Defense", "DefenseResult",
           "FinePruning", "FineTune", "FineTuning", "NeuralCleanse", "create_defense", "defense_class",
           "defense_options", "register_defense"]
