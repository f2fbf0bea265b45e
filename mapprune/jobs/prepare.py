"""The ``mapprune prepare`` job: build and cache an attack's resources ahead of the attack run."""

from ..attacks import ATTACKS, create_attack, load_plugins
from ..attacks.surrogate import SurrogateAttack
from ..data import load_dataset
from ..device import pick_device
from ..errors import MapPruneError, unknown_name


def prepare_attack(attack: str, dataset: str = "cifar10", data_dir=None, *, model: str | None = None,
                   width: int | None = None, epochs: int | None = None, target: int = 0, poison_ratio: float = 0.1,
                   seed: int = 0, device=None, progress: bool = True) -> dict:
    """Builds and caches what ``mapprune attack`` will need: ``create_attack(...).prepare(dataset)`` (clean model,
    perturbation, encoder, generators), then ``prepare_poison`` for what depends on the poisoned images themselves
    (LC's PGD images); returns the attack's config (with the resource hashes).

    ``model``, ``width`` and ``epochs`` set the clean (surrogate) model of the attacks built from one, and
    ``target``, ``poison_ratio`` and ``seed`` choose the poisoned images; they must match what the attack run will
    use (the defaults do), or the run builds its own.
    """
    load_plugins()

    if attack not in ATTACKS:
        raise unknown_name("attack", attack, ATTACKS)
    kw = {k: v for k, v in (("surrogate", model), ("surrogate_width", width), ("surrogate_epochs", epochs))
          if v is not None}
    if kw and not issubclass(ATTACKS[attack], SurrogateAttack):
        users = sorted(n for n, c in ATTACKS.items() if issubclass(c, SurrogateAttack))
        raise MapPruneError(f"--model, --width and --epochs set the clean model of {', '.join(users)}; "
                            f"{attack} has none, so leave them out")
    ds = load_dataset(dataset, data_dir)
    atk = create_attack(attack, ds.image_shape, ds.num_classes, target=target, poison_ratio=poison_ratio, **kw)
    atk.prepare(ds, device=pick_device(device), progress=progress)
    atk.prepare_poison(ds.x_train, ds.y_train, seed)
    return atk.config()
