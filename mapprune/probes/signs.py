"""The trigger-free signs of a backdoor that FMT's testing phase yields, and the fixed thresholds that fire them.

``mapprune scan`` calls a model backdoored when any sign fires; FMT's ``gate`` prunes and unlearns only when one
does. The three signs (docs/scan.md, "What the scan looks at"):

- a probe's **pull** (the largest mean pull to one class of a class's hardest-pulling maps, :func:`.pull.
  target_from_pull`) above ``PULL_THRESHOLD``: set on clean CIFAR-10 models only, which pull 0.13-0.31;
- a **rejected class** (:func:`mapprune.metrics.rejected_classes`): what a clean-label attack that poisoned its
  whole target class leaves;
- the **stimulation test**'s anomaly index above :data:`.stimulation.ANOMALY_THRESHOLD`.
"""

from .stimulation import ANOMALY_THRESHOLD

PULL_THRESHOLD = 0.5


def fired_signs(pulls: dict[str, float], rejected: list[int], stimulation_anomaly: float | None,
                threshold: float = PULL_THRESHOLD) -> list[str]:
    """The signs that fire: ``"<probe>_pull"`` for each probe whose pull is above ``threshold``,
    ``"rejected_class"``, ``"stimulation"`` (None: the stimulation test was not run)."""
    signs = [f"{probe}_pull" for probe, pull in pulls.items() if pull > threshold]
    if rejected:
        signs.append("rejected_class")
    if stimulation_anomaly is not None and stimulation_anomaly > ANOMALY_THRESHOLD:
        signs.append("stimulation")
    return signs
