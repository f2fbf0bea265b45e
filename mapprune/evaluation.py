"""Re-measuring a run folder (and the models its defenses wrote) from disk."""

from pathlib import Path

from .device import pick_device
from .errors import MapPruneError
from .metrics import evaluate
from .runs import Run, load_model_file, load_run, read_result


def evaluate_run(run, *, defense: str | None = None, data_dir=None, device=None, per_class: bool = False) -> dict:
    """ACC / ASR / RA of the run's model, or of ``RUN/defense/<defense>/model.safetensors``.

    ``per_class`` adds ``class_acc``: the clean accuracy of each class, in label order.
    """
    r = load_run(run, data_dir)
    model = r.model if defense is None else defended_model(r, Path(run), defense)
    dev = pick_device(device)
    result = evaluate(model.to(dev), r.test_sets(), num_classes=r.dataset.num_classes if per_class else None)
    return {"run": str(run), "defense": defense, **result}


def defended_model(r: Run, run: Path, defense: str):
    """The model ``defense`` wrote into ``run``/defense/ (checked: a finished result with a model of the run's
    architecture), or one line saying what to run first."""
    folder = run / "defense" / defense
    path = folder / "model.safetensors"
    if not (folder / "result.json").is_file():  # no finished defense of that name
        raise MapPruneError(f"{path} does not exist; run `mapprune defend {defense} {run}` first")
    saved = read_result(folder)  # a damaged result.json: the folder is not a result to trust
    if not path.is_file():
        if saved.get("params", {}).get("detect_only"):
            raise MapPruneError(f"{folder} is a detect-only result: the defense changed no model, so there is "
                                "nothing to evaluate but the run's own model (mapprune eval RUN)")
        raise MapPruneError(f"{path} does not exist; rerun `mapprune defend` for it with --name {defense} "
                            "--overwrite")
    return load_model_file(r.manifest, path)
