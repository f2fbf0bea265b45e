"""Re-measuring a run folder (and the models its defenses wrote) from disk."""

from pathlib import Path

from .device import pick_device
from .errors import MapPruneError
from .metrics import evaluate
from .runs import load_model_file, load_run


def evaluate_run(run, *, defense: str | None = None, data_dir=None, device=None, per_class: bool = False) -> dict:
    """ACC / ASR / RA of the run's model, or of ``RUN/defense/<defense>/model.safetensors``.

    ``per_class`` adds ``class_acc``: the clean accuracy of each class, in label order.
    """
    r = load_run(run, data_dir)
    model = r.model
    if defense is not None:
        path = Path(run) / "defense" / defense / "model.safetensors"
        if not path.is_file():
            raise MapPruneError(f"{path} does not exist; run `mapprune defend {defense} {run}` first")
        model = load_model_file(r.manifest, path)
    dev = pick_device(device)
    result = evaluate(model.to(dev), r.test_sets(), num_classes=r.dataset.num_classes if per_class else None)
    return {"run": str(run), "defense": defense, **result}
