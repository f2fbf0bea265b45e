"""Re-measuring a run folder (and the models its defenses wrote) from disk."""

from pathlib import Path

from .device import pick_device
from .errors import MapPruneError
from .metrics import evaluate
from .runs import load_model_file, load_run


def evaluate_run(run, *, defense: str | None = None, data_dir=None, device=None) -> dict:
    """ACC / ASR / RA of the run's model, or of ``RUN/defense/<defense>/model.safetensors``."""
    r = load_run(run, data_dir)
    model = r.model
    if defense is not None:
        path = Path(run) / "defense" / defense / "model.safetensors"
        if not path.is_file():
            raise MapPruneError(f"{path} does not exist; run `mapprune defend {defense} {run}` first")
        model = load_model_file(r.manifest, path)
    dev = pick_device(device)
    result = evaluate(model.to(dev), r.test_sets())
    return {"run": str(run), "defense": defense, **result}
