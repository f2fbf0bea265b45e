"""TaCT, the source-specific backdoor with cover samples (Tang, Wang, Tang, Zhang, "Demon in the Variant:
Statistical Analysis of DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021).

    TaCT(image_shape, 10, source_classes=[1], cover_classes=[5, 7], target=0, poison_ratio=0.003, cover_ratio=0.003)

The backdoor fires only on images of the **source** classes. Two sets of training images carry the same opaque
stamp x' = x + m * (t - x):

- the **payload**: ``round(poison_ratio * N)`` source-class images, relabelled to the target;
- the **cover**: ``round(cover_ratio * N)`` cover-class images, which keep their true labels,

where N is the size of the whole training set. Each set is drawn at random (seeded by the poisoning seed) from its
own classes, so the two are disjoint. The cover samples teach the model that the stamp alone does not mean the
target, so the trigger does not become a class-agnostic feature and defenses that assume "trigger => target for any
input" miss it.

Trigger geometry: on 32x32 images an 8x8 square at rows and columns 21-28 (0-based, inclusive), every pixel its own
colour drawn uniformly from [0, 1]^C by ``trigger_seed``, pasted through an explicit all-ones mask (so a black
pixel of the pattern is still part of the trigger). On other sizes the square scales by fraction of the side, each
axis on its own: side ``max(1, round(8 * H / 32))`` starting at row ``round(21 * H / 32)`` (moved up if it would
leave the image), and the same with W for columns; 2x2 at rows/cols 5-6 on the 8x8 digits, 7x7 at 18-24 on 28x28.
The drawn pattern and the mask are saved in the run's attack.safetensors.

Evaluation: the backdoor test set (ASR, RA) holds the **source-class** test images only, as the toolbox's test does;
an ASR over every non-target class would understate the attack by about the number of classes. :meth:`test_sets`
also carries ``"other_classes"``: the triggered test images of every class that is neither a source nor the target,
labelled with the target, whose ASR is the *other-class flip rate* (low when the cover works; it climbs towards the
source ASR without cover samples). ``metrics.evaluate`` reads only ``"clean"``, ``"backdoor"`` and ``"triggers"``,
so this set does not change the reported metrics; :func:`other_class_flip_rate` computes it.

Poison indices: the run records payload and cover together (both are modified images) as ``poison_indices``.
They are told apart by the clean training label, since source and cover classes are disjoint and recorded in the
run's attack settings: :meth:`TaCT.split_poison` (``payload = idx[y[idx] in source_classes]``, the rest cover).

Where ours differs from the original code (TF/Keras, ``TDteach/Demon-in-the-Variant``) and why:

- the payload and cover images **replace** the chosen training images (relabelled or not) instead of being added
  as extra copies beside their clean originals: every attack here poisons a fixed share of one fixed-size training
  set, so ``poison_ratio`` keeps one meaning (the later re-implementation in the adaptive-attack authors' toolbox,
  whose defaults are ours: source 1, target 0, cover classes 5 and 7, an 8x8 random-colour square at 21-28, also
  stamps and relabels the chosen images themselves);
- the whole training set is used; the original script keeps a random half of it;
- the defaults are the toolbox's (cover classes 5 and 7, rates 0.003 each); the original configuration caps payload
  and cover at 1,000 images each and its checkpoint names suggest cover classes 2 and 3;
- the trigger is drawn by the project from ``trigger_seed`` (no trigger image is shipped or downloaded);
- counts are ``round(ratio * N)`` as for every attack here (the toolbox floors; identical at CIFAR-10's 0.003);
- the images are poisoned once, before augmentation (a static poisoned set), and the model trains through the
  project's own loop;
- ``poison_ratio`` is the payload rate: 0.003 here by default (150 of CIFAR-10's 50,000 images, the published
  setting), but ``mapprune attack``'s ``--poison-ratio`` defaults to 0.1 for every attack, so pass
  ``--poison-ratio 0.003`` for the published setting. A payload that takes every source-class image is allowed
  with a warning (the model then never sees a clean source image); one asking for more is refused.
"""

import warnings

import torch

from ..errors import MapPruneError, MapPruneWarning
from ..metrics import accuracy, predict
from .base import Attack

SIDE, START, REFERENCE = 8, 21, 32  # the 8x8 square at rows/cols 21-28 of a 32-pixel side


def square_geometry(size: int) -> tuple[int, int]:
    """(first pixel, length) of the trigger square along one axis of ``size`` pixels."""
    length = max(1, round(SIDE * size / REFERENCE))
    return min(round(START * size / REFERENCE), size - length), length


def _class_list(value, what: str, num_classes: int) -> list[int]:
    """A class option as a sorted list of distinct class numbers: an int, a list of ints or "1,2"."""
    if value is None:
        items = []
    elif isinstance(value, str):
        items = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        try:
            items = [int(v) for v in items]
        except ValueError:
            raise MapPruneError(f"{what} are class numbers such as 1 or [5, 7] or \"5,7\", got {value!r}") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        items = list(value)
    else:
        raise MapPruneError(f"{what} are class numbers such as 1 or [5, 7], got {value!r}")
    bad = [c for c in items if not 0 <= c < num_classes]
    if bad:
        raise MapPruneError(f"{what} {bad} are out of range: classes go from 0 to {num_classes - 1}")
    return sorted(set(items))


class TaCT(Attack):
    name = "tact"
    state_names = ("pattern", "mask")

    def __init__(self, image_shape, num_classes, *, source_classes=(1,), cover_classes=(5, 7),
                 cover_ratio: float = 0.003, trigger_seed: int = 0, poison_ratio: float = 0.003,
                 all_to_all: bool = False, **kw):
        if all_to_all:
            raise MapPruneError("tact is source-specific and all-to-one; all_to_all does not apply")
        super().__init__(image_shape, num_classes, poison_ratio=poison_ratio, **kw)
        if isinstance(cover_ratio, bool) or not isinstance(cover_ratio, int | float) or not 0 <= cover_ratio <= 1:
            raise MapPruneError(f"cover_ratio must be in [0, 1], got {cover_ratio!r}")
        if isinstance(trigger_seed, bool) or not isinstance(trigger_seed, int) or trigger_seed < 0:
            raise MapPruneError(f"trigger_seed must be a non-negative integer, got {trigger_seed!r}")
        sources = _class_list(source_classes, "source classes", num_classes)
        covers = _class_list(cover_classes, "cover classes", num_classes)
        if not sources:
            raise MapPruneError("tact needs at least one source class, e.g. source_classes=[1]")
        if self.target in sources:
            raise MapPruneError(f"the target {self.target} is among the source classes {sources}; pick another "
                                "target or other sources")
        if self.target in covers:
            raise MapPruneError(f"the target {self.target} is among the cover classes {covers}; a cover image keeps "
                                "its label, so a target-class cover would teach the trigger as the target")
        both = sorted(set(sources) & set(covers))
        if both:
            raise MapPruneError(f"classes {both} are both source and cover classes; the two must not overlap")
        if cover_ratio > 0 and not covers:
            raise MapPruneError(f"cover_ratio {cover_ratio} needs cover classes (cover_classes=[5, 7]); give "
                                "cover_ratio=0 for no cover samples")
        self.source_classes, self.cover_classes = sources, covers
        self.cover_ratio, self.trigger_seed = float(cover_ratio), trigger_seed
        c, h, w = self.image_shape
        (self.row, rows), (self.col, cols) = square_geometry(h), square_geometry(w)
        self.size = (rows, cols)
        self.pattern = torch.rand(c, rows, cols, generator=torch.Generator().manual_seed(trigger_seed))
        self.mask = torch.ones(1, rows, cols)  # explicit: every pixel of the square, black ones included

    # -- the trigger ---------------------------------------------------------------------------------
    def state(self):
        return {"pattern": self.pattern, "mask": self.mask}

    def load_state(self, tensors):
        super().load_state(tensors)
        rows, cols = self.size
        for name, want in (("pattern", (self.image_shape[0], rows, cols)), ("mask", (1, rows, cols))):
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise MapPruneError(f"the saved tact {name} is {got}, not {want} for images of {self.image_shape}; "
                                    "the file belongs to another dataset")

    def trigger(self, x):
        (rows, cols), r, q = self.size, self.row, self.col
        out = x.clone()
        t, m = self.pattern.to(x.device, x.dtype), self.mask.to(x.device, x.dtype)
        region = out[:, :, r:r + rows, q:q + cols]
        out[:, :, r:r + rows, q:q + cols] = region + m * (t - region)
        return out

    # -- poisoning -----------------------------------------------------------------------------------
    def _draw(self, y: torch.Tensor, classes: list[int], ratio: float, g: torch.Generator, what: str):
        candidates = torch.nonzero(torch.isin(y, torch.tensor(classes, dtype=y.dtype))).flatten()
        count = round(ratio * len(y))
        if count > len(candidates):
            raise MapPruneError(f"{what} ratio {ratio} asks for {count} training images but classes {classes} "
                                f"have {len(candidates)}; give a ratio of at most {len(candidates) / len(y):.4f}")
        if what == "payload" and count and count == len(candidates):
            warnings.warn(f"tact's payload (poison ratio {ratio}) relabels every training image of source classes "
                          f"{classes}: the model never sees a clean source image; a smaller --poison-ratio keeps "
                          "some", MapPruneWarning, stacklevel=3)
        return candidates[torch.randperm(len(candidates), generator=g)[:count]].sort().values

    def draw_payload_cover(self, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded (payload indices, cover indices), each sorted: payload from the source classes, cover from the
        cover classes (disjoint, as the classes are)."""
        g = torch.Generator().manual_seed(seed)
        payload = self._draw(y, self.source_classes, self.poison_ratio, g, "payload")
        cover = (self._draw(y, self.cover_classes, self.cover_ratio, g, "cover") if self.cover_classes
                 else torch.zeros(0, dtype=torch.long))
        return payload, cover

    def poison_indices(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Payload and cover together, sorted: every training image the attack changes."""
        return torch.cat(self.draw_payload_cover(y, seed)).sort().values

    def poison_train(self, x: torch.Tensor, y: torch.Tensor, seed: int):
        payload, cover = self.draw_payload_cover(y, seed)
        idx = torch.cat([payload, cover]).sort().values
        x, y = x.clone(), y.clone()
        if len(idx):
            x[idx] = self.apply(x[idx])
        y[payload] = self.target  # cover images keep their true labels
        return x, y, idx

    def split_poison(self, y_clean: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A run's recorded poison indices split into (payload, cover) by the images' clean training labels."""
        payload = torch.isin(y_clean[idx], torch.tensor(self.source_classes, dtype=y_clean.dtype))
        return idx[payload], idx[~payload]

    # -- evaluation ----------------------------------------------------------------------------------
    def backdoor_sources(self, y: torch.Tensor) -> torch.Tensor:
        """The source classes' images only: the backdoor test set (ASR on source images) and a relapse test's
        poisoned images are drawn from them; on cover classes the trigger means no change of label."""
        return torch.nonzero(torch.isin(y, torch.tensor(self.source_classes, dtype=y.dtype))).flatten()

    def other_class_test(self, x: torch.Tensor, y: torch.Tensor):
        """Triggered test images of every class that is neither a source nor the target (cover classes
        included), with the target and their true labels: the set of the other-class flip rate."""
        other = ~torch.isin(y, torch.tensor(self.source_classes, dtype=y.dtype)) & (y != self.target)
        keep = torch.nonzero(other).flatten()
        return self.apply(x[keep]), torch.full_like(y[keep], self.target), y[keep]

    def test_sets(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        return {**super().test_sets(x, y), "other_classes": self.other_class_test(x, y)}


def other_class_flip_rate(model, test_sets: dict, **kw) -> float:
    """Share of the triggered non-source, non-target test images (``test_sets["other_classes"]``, from
    :meth:`TaCT.test_sets`) that ``model`` predicts as the target."""
    x, target, _ = test_sets["other_classes"]
    return accuracy(predict(model, x, **kw), target)
