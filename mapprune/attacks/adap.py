"""Adap-Blend and Adap-Patch (Qi, Xie, Li, Mahloujifar, Mittal, "Revisiting the Assumption of Latent Separability
for Backdoor Defenses", ICLR 2023): poisoning-only attacks built so that poisoned samples do not form a cluster of
their own in the model's latent space, which cluster-based cleansers (Spectral Signatures, Activation Clustering,
SCAn, SPECTRE) rely on. Two ingredients:

- **cover samples** (the paper's "regularization samples") carry the trigger but keep their true label, beside the
  **payload** samples that carry it and are relabelled to the target;
- **asymmetric triggers**: a weakened or partial trigger in training, a stronger or fuller one at test time.

Both poison once, on the raw images, before augmentation. ``poison_ratio`` is the payload rate and ``cover_ratio``
the cover rate, both shares of the whole training set. One seeded shuffle of every training index (any class, the
target included) gives the payload (its first ``round(N * poison_ratio)``) and the cover (the next
``round(N * cover_ratio)``): disjoint sets.

What a run records: ``poison_train`` returns, and the run saves as ``attack.safetensors:poison_indices``, the
**union** of payload and cover (every image the attack modified), as the ground truth a cleanser is scored on. The
two sets are also saved apart in the attack's state, ``attack.safetensors:state.payload_indices`` and
``state.cover_indices``, and come back as ``run.attack.payload_indices`` / ``run.attack.cover_indices`` after
:func:`mapprune.runs.load_run`. The manifest's ``poison.count`` is payload plus cover; its ``attack`` holds both
rates.

The paper's CIFAR-10 rates are not the command line's default ``--poison-ratio`` (0.1); give them:

    mapprune attack adap-blend --poison-ratio 0.003 --dataset cifar10 --out runs/c10-adap-blend
    mapprune attack adap-patch --poison-ratio 0.003 --dataset cifar10 --out runs/c10-adap-patch

(``cover_ratio`` defaults to the paper's: 0.003 for Adap-Blend, 0.006 for Adap-Patch; from Python the payload rate
defaults to 0.003 as well.) Their ASR is measured like every attack's, on triggered test images whose true label is
not the target, with the test trigger; :meth:`AdapBlend.training_backdoor_test` and
:meth:`AdapPatch.training_backdoor_test` give the same set with the training-strength trigger.
"""

import math

import torch

from ..errors import MapPruneError
from .base import Attack
from .blended import make_pattern

_EMPTY = torch.zeros(0, dtype=torch.long)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


class CoverAttack(Attack):
    """Payload samples (trigger, target label) and cover samples (trigger, true label), drawn by one seeded shuffle.

    A subclass defines :meth:`trigger` (the test trigger) and :meth:`poison_images` (the training trigger of the
    payload and cover images)."""

    name = "cover"
    state_names: tuple[str, ...] = ("payload_indices", "cover_indices")

    def __init__(self, image_shape, num_classes, *, cover_ratio: float, poison_ratio: float = 0.003, **kw):
        super().__init__(image_shape, num_classes, poison_ratio=poison_ratio, **kw)
        if not 0 <= cover_ratio <= 1 or poison_ratio + cover_ratio > 1:
            raise MapPruneError(f"cover_ratio must be in [0, 1] with poison_ratio + cover_ratio <= 1, got "
                                f"cover_ratio={cover_ratio}, poison_ratio={poison_ratio}")
        self.cover_ratio = cover_ratio
        self.payload_indices = _EMPTY  # set by poison_train (and by a run's saved state)
        self.cover_indices = _EMPTY

    def split_indices(self, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(payload, cover): disjoint sorted index sets, the first ``round(N * poison_ratio)`` and the next
        ``round(N * cover_ratio)`` of one seeded shuffle of every training index."""
        n = len(y)
        n_payload = round(self.poison_ratio * n)
        n_cover = min(round(self.cover_ratio * n), n - n_payload)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return perm[:n_payload].sort().values, perm[n_payload:n_payload + n_cover].sort().values

    def poison_indices(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Every image the attack modifies: payload and cover together (sorted)."""
        payload, cover = self.split_indices(y, seed)
        return torch.cat([payload, cover]).sort().values

    detail_name: str = "detail"  # the attribute poison_train keeps poison_images' detail under

    def poison_images(self, x: torch.Tensor, groups: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(training-triggered copies of uint8 images ``x``, a per-image detail of how each was triggered);
        ``groups`` are the positions in ``x`` of the payload and of the cover images."""
        raise NotImplementedError

    def poison_train(self, x, y, seed):
        """Returns (images, labels, payload and cover indices); the two sets apart in ``payload_indices`` and
        ``cover_indices``. Cover images keep their labels."""
        payload, cover = self.split_indices(y, seed)
        idx = torch.cat([payload, cover]).sort().values
        x, y = x.clone(), y.clone()
        x[idx], detail = self.poison_images(x[idx], [torch.searchsorted(idx, payload), torch.searchsorted(idx, cover)],
                                            seed)
        setattr(self, self.detail_name, detail)
        if len(payload):
            y[payload] = self.target_labels(y[payload])
        self.payload_indices, self.cover_indices = payload, cover
        return x, y, idx

    def params(self):
        return {"cover_ratio": self.cover_ratio}

    def state(self):
        return {"payload_indices": self.payload_indices, "cover_indices": self.cover_indices}

    def training_backdoor_test(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
        """:meth:`backdoor_test` with the training-strength trigger instead of the test trigger: (images, attack
        targets, true labels)."""
        keep = self.backdoor_sources(y)
        xb, _ = self.poison_images(x[keep], [torch.arange(len(keep)), _EMPTY], seed)
        return xb, self.target_labels(y[keep]), y[keep]


def _edges(side: int, parts: int) -> list[int]:
    return [i * side // parts for i in range(parts + 1)]


class AdapBlend(CoverAttack):
    """Adap-Blend (Qi et al., ICLR 2023): a blended pattern, planted in training with half of it masked out.

    Training (payload and cover alike): the image is cut into a ``grid`` x ``grid`` grid of pieces (4 x 4 in the
    paper); for each image a fresh seeded random half of the pieces (8 of 16) is masked out, and the pattern is
    blended into the other half only, x' = x + alpha * M * (p - x), with ``alpha`` 0.15. The pixels of the masked
    pieces stay exactly the image's. Test: the whole pattern at ``test_alpha`` 0.2. Payload label = target, cover
    label unchanged; payload and cover rates 0.003 and 0.003 by default (150 + 150 CIFAR-10 images).

    Scaling: the pieces are a fixed grid over the image whatever its size: row and column edges at
    ``i * H // grid`` and ``i * W // grid`` (8 x 8-pixel pieces on 32 x 32 images, 2 x 2 on the 8 x 8 digits;
    where the side is not a multiple of ``grid`` the pieces differ by a pixel). ``grid`` must not exceed the
    image's smaller side. The pattern is made at the image's size.

    Where ours differs from the authors' code, and why:

    - the pattern is the project's own (:func:`mapprune.attacks.blended.make_pattern` from ``pattern_seed``:
      uniform noise mixed with a smooth colour field), not the image the authors blend in, which has no licence;
    - counts are ``round(N * rate)`` (the project's rule) where the code floors; the same at the CIFAR-10 defaults;
    - the pieces are indexed (row, column); the code indexes (column, row) on (row, column) axes, which changes
      nothing because the pieces are drawn at random;
    - any image size (the code is for 32 x 32), as above;
    - the victim is trained with the project's recipe and presets (the paper: ResNet-20, 200 epochs), with the
      same augmentation on top of the static poisoned set (random crop with padding, flip where the dataset
      allows it).
    """

    name = "adap-blend"
    state_names = ("pattern", *CoverAttack.state_names)
    detail_name = "kept_pieces"  # after poison_train: (n, grid, grid) bool, row i for the i-th poison index

    def __init__(self, image_shape, num_classes, *, cover_ratio: float = 0.003, alpha: float = 0.15,
                 test_alpha: float = 0.2, grid: int = 4, pattern_seed: int = 20230501, **kw):
        super().__init__(image_shape, num_classes, cover_ratio=cover_ratio, **kw)
        if not 0 < alpha <= 1 or not 0 < test_alpha <= 1:
            raise MapPruneError(f"alpha and test_alpha are blend weights in (0, 1], got {alpha} and {test_alpha}")
        if isinstance(grid, bool) or not isinstance(grid, int) or not 2 <= grid <= min(self.image_shape[1:]):
            raise MapPruneError(f"grid is the pieces per side, from 2 to the image's smaller side "
                                f"{min(self.image_shape[1:])}, got {grid!r}")
        self.alpha, self.test_alpha, self.grid, self.pattern_seed = alpha, test_alpha, grid, pattern_seed
        self.pattern = make_pattern(self.image_shape, pattern_seed)

    def params(self):
        return {**super().params(), "alpha": self.alpha, "test_alpha": self.test_alpha, "grid": self.grid,
                "pattern_seed": self.pattern_seed}

    def state(self):
        return {"pattern": self.pattern, **super().state()}

    def load_state(self, tensors):
        super().load_state(tensors)
        if tuple(self.pattern.shape) != self.image_shape:
            raise MapPruneError(f"the saved adap-blend pattern is {tuple(self.pattern.shape)}, not the images' "
                                f"{self.image_shape}")
        self.pattern = self.pattern.float()

    def trigger(self, x):
        return x + self.test_alpha * (self.pattern.to(x.device, x.dtype) - x)

    def draw_pieces(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(n, grid, grid) bool: the pieces each of n images keeps (True) and masks out (False), half of them."""
        pieces = self.grid * self.grid
        order = torch.stack([torch.randperm(pieces, generator=g) for _ in range(n)]) if n else _EMPTY.view(0, pieces)
        keep = order >= pieces // 2  # a random half of the pieces (the upper ranks) is masked out
        return keep.view(n, self.grid, self.grid)

    def piece_pixels(self, keep: torch.Tensor) -> torch.Tensor:
        """The pixel mask (n, 1, H, W) of per-image piece masks (n, grid, grid)."""
        h, w = self.image_shape[1:]
        rows = torch.bucketize(torch.arange(h), torch.tensor(_edges(h, self.grid)[1:]), right=True)
        cols = torch.bucketize(torch.arange(w), torch.tensor(_edges(w, self.grid)[1:]), right=True)
        return keep[:, rows][:, :, cols].unsqueeze(1)

    def training_trigger(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The training trigger on float images (N, C, H, W): the pattern at ``alpha`` on the pieces ``keep``
        ((N, grid, grid) bool) only."""
        m = self.piece_pixels(keep).to(x.device, x.dtype)
        return x + self.alpha * m * (self.pattern.to(x.device, x.dtype) - x)

    def poison_images(self, x, groups, seed):
        keep = self.draw_pieces(len(x), torch.Generator().manual_seed(seed + 1_000_033))
        out = torch.empty_like(x)
        for i in range(0, len(x), 4096):
            out[i:i + 4096] = _quantise(self.training_trigger(x[i:i + 4096].float() / 255, keep[i:i + 4096]))
        return out, keep


# The paper's Adap-Patch geometry on 32 x 32 images: rows and columns (first, last), inclusive.
_SQUARE_CORNER = ((27, 31), (27, 31))  # T1: a 5 x 5 colour patch, bottom-right
_LOGO = ((1, 13), (18, 30))  # T2: a 13 x 13 logo, top-right
_CHECKER = 3  # T3: a 3 x 3 black-and-white checkerboard in each corner
_SQUARE = ((21, 28), (21, 28))  # T4: an 8 x 8 random-colour square
_MIN = {"corner": 3, "logo": 3, "checker": 2, "square": 2}  # smallest sides on small images


def _box(span: tuple[int, int], side: int, minimum: int) -> tuple[int, int]:
    """(start, stop) on a side of ``side`` pixels of the inclusive 32-pixel span, at least ``minimum`` long."""
    start = math.floor(span[0] * side / 32 + 0.5)
    stop = math.floor((span[1] + 1) * side / 32 + 0.5)
    size = min(side, max(minimum, stop - start))
    start = min(start, side - size)
    return start, start + size


class AdapPatch(CoverAttack):
    """Adap-Patch (Qi et al., ICLR 2023): four different weak patch triggers in training, two at full strength at test.

    Training: each payload or cover image carries exactly one of four triggers, x' = x + alpha_j * m_j * (p_j - x);
    the sorted payload list is cut into four consecutive chunks (chunk j gets trigger j), and the cover list the
    same way (chunk sizes differ by at most one). On 32 x 32 images:

    ==  ============================================================  =========================  =====
    j   trigger                                                       rows / columns             alpha
    ==  ============================================================  =========================  =====
    1   a 5 x 5 random-colour patch                                   27-31 / 27-31              0.5
    2   a 13 x 13 logo (a disc of two blended random colours with a   1-13 / 18-30               0.2
        hole; the mask is its shape)
    3   a 3 x 3 black-and-white checkerboard in each of the four      corners                    0.5
        corners (mask: the four whole blocks, 36 pixels)
    4   an 8 x 8 random-colour square (full mask)                     21-28 / 21-28              0.3
    ==  ============================================================  =========================  =====

    Test: two triggers at ``test_alpha`` 1: trigger 1's patch in **both** bottom corners (the bottom-left one is
    never seen in training), then trigger 3's checkerboard in the four corners over it. Payload and cover rates
    0.003 and 0.006 by default (150 + 300 CIFAR-10 images). Colours come from ``trigger_seed``.

    Scaling: every box is placed and sized by its fraction of the 32-pixel side (start and end at
    ``round(k * side / 32)``, rows by the height and columns by the width), with smallest sides so each trigger keeps
    its structure on small images: the corner patch 3, the logo 3, the checkerboard 2 (still black and white) and
    the square 2; a box grown to its smallest side moves inwards to stay on the image. The corner patch is always
    larger than the checkerboard, so the test trigger's patches show around it. On the 8 x 8 digits: patch 3 x 3
    at rows/columns 5-7, logo rows 0-3 x columns 5-7, checkerboard 2 x 2 per corner, square rows/columns 5-6.

    Where ours differs from the authors' code, and why:

    - the four patterns are the project's own, drawn from ``trigger_seed`` with the geometry above, not the
      authors' trigger images, which have no licence; each mask is explicit (the code takes a mask image where it
      has one and otherwise the trigger's non-black pixels);
    - where the test trigger's two parts overlap (the bottom-right corner) ours draws the checkerboard last (an
      order the paper does not state);
    - counts are ``round(N * rate)`` where the code floors (the same at the CIFAR-10 defaults);
    - any image size (the code is for 32 x 32), as above;
    - the victim is trained with the project's recipe and presets (the paper: ResNet-20, 200 epochs), with the same
      augmentation on top of the static poisoned set.
    """

    name = "adap-patch"
    state_names = ("train_patterns", "train_masks", "test_pattern", "test_mask", *CoverAttack.state_names)
    detail_name = "trigger_ids"  # after poison_train: the training trigger (0 to 3) of the i-th poison index

    def __init__(self, image_shape, num_classes, *, cover_ratio: float = 0.006, alpha_corner: float = 0.5,
                 alpha_logo: float = 0.2, alpha_checker: float = 0.5, alpha_square: float = 0.3,
                 test_alpha: float = 1.0, trigger_seed: int = 20230502, **kw):
        super().__init__(image_shape, num_classes, cover_ratio=cover_ratio, **kw)
        alphas = (alpha_corner, alpha_logo, alpha_checker, alpha_square, test_alpha)
        if not all(0 < a <= 1 for a in alphas):
            raise MapPruneError(f"adap-patch's alphas are blend weights in (0, 1], got {alphas}")
        self.alpha_corner, self.alpha_logo, self.alpha_checker, self.alpha_square = alphas[:4]
        self.test_alpha, self.trigger_seed = test_alpha, trigger_seed
        self.build(trigger_seed)

    @property
    def alphas(self) -> tuple[float, float, float, float]:
        return self.alpha_corner, self.alpha_logo, self.alpha_checker, self.alpha_square

    def build(self, seed: int) -> None:
        """Draws the four training triggers and the test trigger as whole-image canvases and masks."""
        c, h, w = self.image_shape
        g = torch.Generator().manual_seed(seed)
        patterns, masks = torch.zeros(4, c, h, w), torch.zeros(4, 1, h, w)
        # 1: a random-colour patch, bottom-right
        (r0, r1), (q0, q1) = _box(_SQUARE_CORNER[0], h, _MIN["corner"]), _box(_SQUARE_CORNER[1], w, _MIN["corner"])
        corner = torch.rand(c, r1 - r0, q1 - q0, generator=g)
        patterns[0, :, r0:r1, q0:q1], masks[0, :, r0:r1, q0:q1] = corner, 1
        # 2: a logo, top-right: a disc with a hole, two random colours blended along a diagonal
        (a0, a1), (b0, b1) = _box(_LOGO[0], h, _MIN["logo"]), _box(_LOGO[1], w, _MIN["logo"])
        lh, lw = a1 - a0, b1 - b0
        u = (torch.arange(lh) + 0.5) / lh * 2 - 1
        v = (torch.arange(lw) + 0.5) / lw * 2 - 1
        radius = (u[:, None] ** 2 + v[None, :] ** 2).sqrt()
        shape = (radius <= 1.0) & ((radius >= 0.4) if min(lh, lw) >= 7 else True)
        first, second = 0.2 + 0.8 * torch.rand(c, 1, 1, generator=g), 0.2 + 0.8 * torch.rand(c, 1, 1, generator=g)
        mix = ((u[:, None] + v[None, :]) / 4 + 0.5).clamp(0, 1)
        patterns[1, :, a0:a1, b0:b1] = (1 - mix) * first + mix * second
        masks[1, :, a0:a1, b0:b1] = shape.float()
        # 3: a black-and-white checkerboard in each corner
        k = min(max(_MIN["checker"], math.floor(_CHECKER * min(h, w) / 32 + 0.5)), (min(h, w)) // 2)
        cells = torch.arange(k) * min(3, k) // k
        board = ((cells[:, None] + cells[None, :]) % 2 == 0).float()
        for rs in (slice(0, k), slice(h - k, h)):
            for qs in (slice(0, k), slice(w - k, w)):
                patterns[2, :, rs, qs], masks[2, :, rs, qs] = board, 1
        # 4: a random-colour square
        (s0, s1), (t0, t1) = _box(_SQUARE[0], h, _MIN["square"]), _box(_SQUARE[1], w, _MIN["square"])
        patterns[3, :, s0:s1, t0:t1], masks[3, :, s0:s1, t0:t1] = torch.rand(c, s1 - s0, t1 - t0, generator=g), 1
        # test: the corner patch in both bottom corners, then the checkerboard over them
        test, test_mask = torch.zeros(c, h, w), torch.zeros(1, h, w)
        test[:, r0:r1, q0:q1], test[:, r0:r1, :q1 - q0] = corner, corner
        test_mask[:, r0:r1, q0:q1], test_mask[:, r0:r1, :q1 - q0] = 1, 1
        test = torch.where(masks[2].bool(), patterns[2], test)
        self.train_patterns, self.train_masks = patterns, masks
        self.test_pattern, self.test_mask = test, torch.maximum(test_mask, masks[2])

    def params(self):
        return {**super().params(), "alpha_corner": self.alpha_corner, "alpha_logo": self.alpha_logo,
                "alpha_checker": self.alpha_checker, "alpha_square": self.alpha_square, "test_alpha": self.test_alpha,
                "trigger_seed": self.trigger_seed}

    def state(self):
        return {"train_patterns": self.train_patterns, "train_masks": self.train_masks,
                "test_pattern": self.test_pattern, "test_mask": self.test_mask, **super().state()}

    def load_state(self, tensors):
        super().load_state(tensors)
        c, h, w = self.image_shape
        want = {"train_patterns": (4, c, h, w), "train_masks": (4, 1, h, w), "test_pattern": (c, h, w),
                "test_mask": (1, h, w)}
        for k, shape in want.items():
            value = getattr(self, k)
            if tuple(value.shape) != shape:
                raise MapPruneError(f"the saved adap-patch {k} is {tuple(value.shape)}, not {shape} for "
                                    f"{self.image_shape} images")
            setattr(self, k, value.float())

    def trigger(self, x):
        m = self.test_alpha * self.test_mask.to(x.device, x.dtype)
        return x + m * (self.test_pattern.to(x.device, x.dtype) - x)

    def training_trigger(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Training trigger ``j`` (0 to 3) on float images (N, C, H, W)."""
        m = self.alphas[j] * self.train_masks[j].to(x.device, x.dtype)
        return x + m * (self.train_patterns[j].to(x.device, x.dtype) - x)

    def assign(self, n: int, groups: list[torch.Tensor]) -> torch.Tensor:
        """Which training trigger (0 to 3) each of n images gets: each group cut into four consecutive chunks."""
        which = torch.zeros(n, dtype=torch.long)
        for group in groups:
            for j, chunk in enumerate(torch.tensor_split(group, 4)):
                which[chunk] = j
        return which

    def poison_images(self, x, groups, seed):
        which = self.assign(len(x), groups)
        out = torch.empty_like(x)
        for j in range(4):
            sel = torch.nonzero(which == j).flatten()
            if len(sel):
                out[sel] = _quantise(self.training_trigger(x[sel].float() / 255, j))
        return out, which
