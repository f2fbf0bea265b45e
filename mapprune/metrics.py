"""ACC, ASR, RA and DER exactly as in BackdoorBench's protocol (see docs/protocol.md)."""

import torch
from torch import nn

from .device import autocast


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device=None, amp: bool = True) -> torch.Tensor:
    """Predicted labels for uint8 images (N, C, H, W); returns a CPU int64 tensor."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device, non_blocking=True).float().div_(255)
        xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(model(xb).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    # An exact fraction in double precision (a float32 mean gives 0.95061731... for 385/405).
    return (pred == y).sum().item() / len(y) if len(y) else float("nan")


def backdoor_metrics(clean_pred, y_clean, bd_pred, y_target, y_true) -> dict:
    """ACC on the clean test set; ASR (-> target) and RA (-> true label) on the backdoor test set."""
    return {"acc": accuracy(clean_pred, y_clean), "asr": accuracy(bd_pred, y_target), "ra": accuracy(bd_pred, y_true)}


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    """Clean accuracy within each true class (None for a class with no test image)."""
    hits = torch.bincount(y[pred == y], minlength=num_classes).tolist()
    count = torch.bincount(y, minlength=num_classes).tolist()
    return [h / c if c else None for h, c in zip(hits, count)]


REJECTED = 0.25  # a class whose clean accuracy is below this share of the median class's is "rejected"
MIN_CLASS_IMAGES = 10  # fewer clean images of a class than this: its accuracy is not judged


def judged_class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    """Per-class accuracy, rounded, with None for a class of fewer than ``MIN_CLASS_IMAGES`` images."""
    counts = torch.bincount(y, minlength=num_classes).tolist()
    return [None if n < MIN_CLASS_IMAGES else round(a, 4)
            for a, n in zip(per_class_accuracy(pred, y, num_classes), counts)]


def rejected_classes(class_acc: list, ratio: float = REJECTED) -> list[int]:
    """The classes whose accuracy is below ``ratio`` times the median class's (None entries are not judged): the
    trigger-free sign of a clean-label attack that poisoned its whole target class (the model then predicts the
    class only with the trigger)."""
    known = [a for a in class_acc if a is not None]
    if len(known) < 2:
        return []
    median = float(torch.tensor(known).median())
    return [c for c, a in enumerate(class_acc) if a is not None and a < ratio * median]


def der(before: dict, after: dict) -> float:
    """Defense effectiveness rating: [max(0, dASR) - max(0, dACC) + 1] / 2 with fractions in [0, 1]."""
    d_asr = before["asr"] - after["asr"]
    d_acc = before["acc"] - after["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1) / 2


def evaluate(model: nn.Module, test_sets: dict, *, num_classes: int | None = None, **kw) -> dict:
    """Metrics of a model on {"clean": (x, y), "backdoor": (x_bd, y_target, y_true)}; where ``test_sets`` also
    has ``"triggers"`` ({label: (x_bd, y_target, y_true)}, whose concatenation is "backdoor"), ASR and RA per
    trigger under ``"triggers"``.

    With ``num_classes`` the result also holds ``class_acc``, the clean accuracy of each class (a clean-label
    attack that consumed its target class shows there as a class the model never gets right).
    """
    x, y = test_sets["clean"]
    xb, yt, yy = test_sets["backdoor"]
    pred = predict(model, x, **kw)
    bd_pred = predict(model, xb, **kw)
    result = backdoor_metrics(pred, y, bd_pred, yt, yy)
    if "triggers" in test_sets:  # several triggers: the backdoor set is theirs concatenated, in this order
        result["triggers"], start = {}, 0
        for label, (_, t_target, t_true) in test_sets["triggers"].items():
            part = bd_pred[start:start + len(t_target)]
            result["triggers"][label] = {"asr": accuracy(part, t_target), "ra": accuracy(part, t_true)}
            start += len(t_target)
    if num_classes is not None:
        result["class_acc"] = per_class_accuracy(pred, y, num_classes)
    return result
