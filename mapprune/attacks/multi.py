"""Several triggers in one model: each a registered attack with its own target, planted in the same training set.

    mapprune attack multi --attack-opt triggers=badnets:0,blended:5
    MultiAttack(shape, 10, triggers=[{"name": "badnets", "target": 0}, {"name": "blended", "target": 5, "alpha": 0.1}])

A trigger is ``NAME:TARGET`` with optional ``:KEY=VALUE`` options of that attack (``blended:5:alpha=0.1``,
``badnets:0:poison_ratio=0.05``), or a dict of the same. Each trigger poisons ``poison_ratio`` of the training set
(its own value where given), drawn by the trigger's own attack with seed ``seed + i``; an image drawn by several
triggers keeps the first one's change (the later ones poison slightly fewer images). The backdoor test set is the
concatenation of every trigger's own (so ASR and RA are over all of them); :meth:`test_sets` also gives each
trigger's set, and ``metrics.evaluate`` reports ASR and RA per trigger under ``"triggers"``.
"""

import json

import torch

from ..errors import MapPruneError
from .base import Attack


def parse_triggers(spec) -> list[dict]:
    """``"badnets:0,blended:5:alpha=0.1"`` (or a list of such strings or of dicts) -> a list of dicts with at least
    ``name`` and ``target``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, dict):
            d = dict(item)
        else:
            name, _, rest = str(item).strip().partition(":")
            target, _, options = rest.partition(":")
            if not name or not target.strip().lstrip("-").isdigit():
                raise MapPruneError(f"a trigger is NAME:TARGET[:KEY=VALUE...], e.g. badnets:0 or blended:5:alpha=0.1;"
                                    f" got {item!r}")
            d = {"name": name, "target": int(target)}
            for pair in filter(None, options.split(":")):
                key, sep, value = pair.partition("=")
                if not sep or not key:
                    raise MapPruneError(f"trigger option {pair!r} in {item!r} is not KEY=VALUE")
                try:
                    d[key] = json.loads(value)
                except json.JSONDecodeError:
                    d[key] = value
        if "name" not in d or "target" not in d:
            raise MapPruneError(f"each trigger needs a name and a target, got {d}")
        out.append(d)
    if len(out) < 2:
        raise MapPruneError(f"multi plants two or more triggers; got {len(out)} ({spec!r})")
    return out


class MultiAttack(Attack):
    name = "multi"

    def __init__(self, image_shape, num_classes, *, triggers="badnets:0,blended:5", target: int | None = None,
                 all_to_all: bool = False, poison_ratio: float = 0.1):
        # lazy: import cycle (mapprune.attacks imports this module before it defines create_attack)
        from . import create_attack

        # ``target`` is taken for the common signature and ignored: each trigger has its own (the first is
        # ``self.target``, what the single-target tools read).
        parts = parse_triggers(triggers)
        if all_to_all:
            raise MapPruneError("multi's triggers are all-to-one, each with its own target; all_to_all does not apply")
        super().__init__(image_shape, num_classes, target=parts[0]["target"], poison_ratio=poison_ratio)
        self.parts = []
        for i, p in enumerate(parts):
            p = dict(p)
            if p["name"] == self.name:
                raise MapPruneError("a multi trigger cannot itself be multi")
            kw = {k: v for k, v in p.items() if k not in ("name", "clean_label", "all_to_all")}
            kw.setdefault("poison_ratio", poison_ratio)
            try:
                self.parts.append(create_attack(p["name"], image_shape, num_classes, **kw))
            except TypeError as e:
                raise MapPruneError(f"multi trigger {i + 1} ({p['name']}): {e}") from None
        labels = [f"{a.name}->{a.target}" for a in self.parts]
        self.labels = [lab if labels.count(lab) == 1 else f"{lab}#{i + 1}" for i, lab in enumerate(labels)]
        self.state_names = tuple(f"{i}.{k}" for i, a in enumerate(self.parts) for k in a.state_names)

    def params(self) -> dict:
        return {"triggers": [{k: v for k, v in a.config().items() if k not in ("clean_label", "all_to_all")}
                             for a in self.parts]}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, a in enumerate(self.parts) for k, v in a.state().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state({})  # nothing of multi's own; the names are checked below
        unknown = sorted(set(tensors) - set(self.state_names))
        if unknown:
            raise MapPruneError(f"the saved multi attack state has unexpected entries {unknown}; it takes only "
                                f"{list(self.state_names) or 'none'}")
        for i, a in enumerate(self.parts):
            prefix = f"{i}."
            a.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def prepare(self, dataset, *, device=None, progress: bool = True) -> None:
        for a in self.parts:
            a.prepare(dataset, device=device, progress=progress)

    def prepare_poison(self, x, y, seed: int) -> None:
        for i, a in enumerate(self.parts):
            a.prepare_poison(x, y, seed + i)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Image j gets trigger j mod k (a mixed sample, for figures and the diagnostic)."""
        out = x.clone()
        for i, a in enumerate(self.parts):
            sel = torch.arange(i, len(x), len(self.parts))
            if len(sel):
                out[sel] = a.trigger(x[sel])
        return out

    def poison_train(self, x: torch.Tensor, y: torch.Tensor, seed: int):
        out, labels = x.clone(), y.clone()
        claimed = torch.zeros(len(y), dtype=torch.bool)
        poisoned = []
        for i, a in enumerate(self.parts):
            xi, yi, idx = a.poison_train(x, y, seed + i)
            changed = (xi != x).flatten(1).any(1) | (yi != y)
            changed[idx] = True
            take = changed & ~claimed
            out[take], labels[take] = xi[take], yi[take]
            claimed |= take
            keep = torch.zeros(len(y), dtype=torch.bool)
            keep[idx] = True
            poisoned.append(torch.nonzero(keep & take).flatten())
        self.part_indices = poisoned
        return out, labels, torch.cat(poisoned).sort().values

    def triggered_tests(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
        """Each trigger's backdoor test set by label (``"badnets->0"``)."""
        return {lab: a.backdoor_test(x, y) for lab, a in zip(self.labels, self.parts)}

    def backdoor_test(self, x: torch.Tensor, y: torch.Tensor):
        sets = list(self.triggered_tests(x, y).values())
        return tuple(torch.cat([s[j] for s in sets]) for j in range(3))

    def test_sets(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        tests = self.triggered_tests(x, y)
        joined = tuple(torch.cat([s[j] for s in tests.values()]) for j in range(3))
        return {"clean": (x, y), "backdoor": joined, "triggers": tests}
