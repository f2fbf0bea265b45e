"""Defenses: one file each, one registry. ``create_defense(name, **kw).repair(model, images, labels)``."""

from ..errors import unknown_name
from .base import Defense, DefenseResult
from .fmt import FMT
from .ft import FineTune
from .scoring import score_feature_maps

DEFENSES: dict[str, type[Defense]] = {cls.name: cls for cls in (FMT, FineTune)}


def create_defense(name: str, **kw) -> Defense:
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    return DEFENSES[name](**kw)


__all__ = ["DEFENSES", "FMT", "Defense", "DefenseResult", "FineTune", "create_defense", "score_feature_maps"]
