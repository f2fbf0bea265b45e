"""The one validator of image batches handed to the library: (N, C, H, W) pixels, uint8 in [0, 255] or floats in
[0, 1] (normalisation belongs inside the model), optionally with as many labels as images."""

import torch

from .errors import MapPruneError


def checked_images(images, labels=None, *, what: str = "images") -> torch.Tensor:
    """``images`` as a tensor, after checking shape, pixel range and (with ``labels``) the label count."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise MapPruneError(f"{what} must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not torch.is_floating_point(x) or (x.numel() and (x.min() < 0 or x.max() > 1)):
            raise MapPruneError(f"{what} must be uint8 in [0, 255] or floats in [0, 1] (not normalised: "
                                "normalisation belongs inside the model)")
    if labels is not None and (len(x) != len(labels) or len(x) == 0):
        raise MapPruneError(f"need as many labels as {what} (got {len(x)} {what}, {len(labels)} labels)")
    return x


def as_uint8(images, labels=None, *, what: str = "images") -> torch.Tensor:
    x = checked_images(images, labels, what=what)
    return x if x.dtype == torch.uint8 else x.mul(255).round_().to(torch.uint8)


def as_unit(images, labels=None, *, what: str = "images") -> torch.Tensor:
    """Float pixels in [0, 1]."""
    x = checked_images(images, labels, what=what)
    return x.float() / 255 if x.dtype == torch.uint8 else x
