"""Sentences that ``defend`` and ``scan`` both print, so the two commands say a detection sign the same way."""

import statistics


def rejected_line(c: int, class_acc: list) -> str:
    """A class the model rejects (metrics.rejected_classes): its clean accuracy against the median class's."""
    return (f"class {c} rejected: the model gets {class_acc[c]:.0%} of its clean images right (median class "
            f"{statistics.median(class_acc):.0%}), the mark of a clean-label attack's target")


def stimulation_line(t: dict) -> str:
    """The stimulation test's class and anomaly index, over or under the scan's threshold."""
    # lazy: mapprune.probes imports torch; loads only when the command runs (kept out of `import mapprune.cli`)
    from ..probes import ANOMALY_THRESHOLD

    side = "over" if t["anomaly_index"] > ANOMALY_THRESHOLD else "under"
    return (f"stimulation test: maps pull to class {t['target']} (anomaly index {t['anomaly_index']:.1f}, {side} "
            f"the scan's {ANOMALY_THRESHOLD:g})")
