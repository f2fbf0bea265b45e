"""ACC / ASR / RA / DER on hand-made numbers."""

import math

import pytest
import torch
from torch import nn

from mapprune.metrics import accuracy, backdoor_metrics, der, evaluate, per_class_accuracy, predict


def t(*v):
    return torch.tensor(v)


def test_acc_asr_ra_by_hand():
    # clean: 4 of 5 right; backdoor set (true labels 1,2,3,4; target 0): 3 go to the target, 1 stays right
    m = backdoor_metrics(t(0, 1, 2, 3, 9), t(0, 1, 2, 3, 4), t(0, 0, 3, 0), t(0, 0, 0, 0), t(1, 2, 3, 4))
    assert m == {"acc": 0.8, "asr": 0.75, "ra": 0.25}  # exact fractions, not float32 approximations


def test_fractions_are_exact():
    pred = torch.zeros(405, dtype=torch.long)
    pred[:385] = 1
    assert accuracy(pred, torch.ones(405, dtype=torch.long)) == 385 / 405


def test_asr_and_ra_all_to_all():
    y_true = t(0, 1, 2, 9)
    y_target = (y_true + 1) % 10
    m = backdoor_metrics(t(0), t(0), t(1, 2, 2, 5), y_target, y_true)
    assert m["asr"] == pytest.approx(0.5) and m["ra"] == pytest.approx(0.25)


def test_accuracy_of_nothing_is_nan():
    assert math.isnan(accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))


def test_der_by_hand():
    before = {"acc": 0.9, "asr": 1.0}
    assert der(before, {"acc": 0.88, "asr": 0.02}) == pytest.approx((0.98 - 0.02 + 1) / 2)
    assert der(before, before) == pytest.approx(0.5)
    # a defense that raises ACC is not rewarded for it, one that raises ASR is not punished beyond 0
    assert der(before, {"acc": 0.95, "asr": 0.0}) == pytest.approx(1.0)
    assert der(before, {"acc": 0.5, "asr": 1.0}) == pytest.approx((0 - 0.4 + 1) / 2)
    assert der({"acc": 0.9, "asr": 0.5}, {"acc": 0.9, "asr": 0.8}) == pytest.approx(0.5)


class Fixed(nn.Module):
    """Predicts the image's top-left pixel value (as a class), to test predict/evaluate end to end."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        k = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(k, 10).float() + 0 * self.w


def test_predict_and_evaluate_on_uint8_images():
    x = torch.zeros(7, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    model = Fixed().train()
    pred = predict(model, x, batch_size=3, amp=False)
    assert pred.tolist() == [0, 1, 2, 3, 4, 5, 6] and pred.dtype == torch.int64
    assert model.training  # mode restored
    xb = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    xb[:, 0, 0, 0] = torch.tensor([0, 0, 0, 5])
    m = evaluate(model, {"clean": (x, t(0, 1, 2, 3, 4, 5, 0)), "backdoor": (xb, t(0, 0, 0, 0), t(1, 2, 3, 5))},
                 amp=False)
    assert m == {"acc": pytest.approx(6 / 7), "asr": pytest.approx(0.75), "ra": pytest.approx(0.25)}
    per = evaluate(model, {"clean": (x, t(0, 1, 2, 3, 4, 5, 0)), "backdoor": (xb, t(0, 0, 0, 0), t(1, 2, 3, 5))},
                   amp=False, num_classes=7)
    assert per["class_acc"] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, None]  # the last 0 is predicted 6; no class 6


def test_per_class_accuracy_by_hand():
    # class 0: 1 of 3 right; class 1: 2 of 2; class 2: 0 of 1 (a class the model never gets); class 3: absent
    pred, y = t(0, 1, 1, 1, 1, 0), t(0, 0, 0, 1, 1, 2)
    assert per_class_accuracy(pred, y, 4) == [1 / 3, 1.0, 0.0, None]
