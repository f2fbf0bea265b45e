"""BackdoorBench interop: ``mapprune import-backdoorbench PATH --out RUN`` turns one of BackdoorBench's attack
results (``attack_result.pt``: the model's weights, the poisoned training indices, the dataset's name) into a
mapprune run folder that ``eval``, ``defend`` and ``report`` use.

The file is a pickle. It is read with PyTorch's restricted (``weights_only``) unpickler, allowing only tensors,
NumPy arrays of plain numbers and plain containers: anything else (an arbitrary class, a function to call) is
refused before it can run, with an error that names it. BackdoorBench's attack name and settings are not in the
file; the user gives them (``--attack``, ``--attack-opt``, ``--target``, and ``--pattern`` for Blended's image).
Triggers rebuilt: BadNets (the 3x3 white corner square), Blended (with the user's blend image), SIG, WaNet (from
its saved warping grids, see ``wanet_grids``); for the others the import stops and says which test-time trigger is
missing.

WaNet, as BackdoorBench's attack/wanet.py makes and applies it: ``noise_grid`` (1, H, H, 2), k x k uniform control
values in [-1, 1] divided by their mean |value| and upsampled bicubically (align_corners=True); ``identity_grid``
(1, H, H, 2), the pixel positions in [-1, 1] (x first). The backdoor image is
``grid_sample(x, clamp((identity_grid + s * noise_grid / H) * grid_rescale, -1, 1))``, bilinear, zero padding,
align_corners=True, on the normalised image, then denormalised: the same as warping the [0, 1] pixels, since every
sampling point lies inside the image and the weights sum to 1. That is mapprune's WaNet trigger with the grids
given (``WaNet.from_grids``); s, k, grid_rescale and cross_ratio are not in the files and come from
``--attack-opt`` (BackdoorBench's defaults otherwise). BackdoorBench keeps the grids out of attack_result.pt: they
are in the ``state_dict.pt`` its wanet.py writes beside it every ``frequency_save`` epochs (0, never, in its default
configuration), or in the checkpoint of BackdoorBench's first release (``<dataset>_<mode>_morph.pth.tar``).
"""

import pickle
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..attacks import attack_class, create_attack
from ..attacks.wanet import WaNet
from ..checkpoint import load_state_into
from ..data import load_dataset
from ..device import pick_device
from ..errors import MapPruneError
from ..metrics import evaluate
from ..models import create_model
from ..options import check_options
from ..runs import RunWriter, versions, write_json
from .attack import save_run_files

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

# BackdoorBench's input normalisation per dataset (its models take normalised tensors; mapprune's take pixels and
# normalise inside, so the imported model gets these in its wrapper).
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
# BackdoorBench's model name -> mapprune's architecture with BackdoorBench's exact state-dict layout. Its own
# PreActResNet18; the others are torchvision's ImageNet constructors with only num_classes changed
# (mapprune.models.torchvision_bb). Not importable yet: densenet121/161, mobilenet_v2/v3_large, efficientnet_b0/b3,
# convnext_tiny, vit_*, alexnet, squeezenet, googlenet, inception_v3, shufflenet, mnasnet, resnext, wide_resnet,
# senet18.
MODELS = {
    "preactresnet18": "preactresnet18-bb",
    "resnet18": "resnet18-bb",
    "resnet34": "resnet34-bb",
    "resnet50": "resnet50-bb",
    "vgg11": "vgg11-bb",
    "vgg16": "vgg16-bb",
    "vgg19": "vgg19-bb",
    "vgg19_bn": "vgg19_bn-bb",
}
# The first conv's weight: its shape gives the width (first stage's channels) and the input channels.
STEM = {"preactresnet18-bb": "conv1.weight", "resnet18-bb": "conv1.weight", "resnet34-bb": "conv1.weight",
        "resnet50-bb": "conv1.weight", "vgg11-bb": "features.0.weight", "vgg16-bb": "features.0.weight",
        "vgg19-bb": "features.0.weight", "vgg19_bn-bb": "features.0.weight"}
ATTACK_NAMES = {"badnet": "badnets", "badnets": "badnets", "blended": "blended", "sig": "sig", "wanet": "wanet"}
REBUILDABLE = ("badnets", "blended", "sig", "wanet")
REQUIRED = ("model_name", "num_classes", "model", "clean_data", "bd_test")
# BackdoorBench's WaNet settings (config/attack/wanet/default.yaml); its files do not hold them.
WANET_DEFAULTS = {"s": 0.5, "k": 4, "grid_rescale": 1.0, "cross_ratio": 2.0}
WANET_GRIDS = ("identity_grid", "noise_grid")


# What the restricted unpickler says of a pickle it cannot parse (cut short, or not written by torch.save), as
# opposed to one naming something it must not load.
DAMAGED_PICKLE = ("Unsupported operand", "String is too long", "persistent id")


def _allowed_globals() -> list:
    """What the restricted unpickler accepts besides tensors and containers: NumPy arrays of numbers and booleans
    (the poison indicators), never object arrays."""
    allowed = [_reconstruct, np.ndarray, np.dtype, Counter]  # Counter: MultiStepLR's milestones in state_dict.pt
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes)
                    if n.endswith("DType") and n not in ("ObjectDType", "VoidDType", "StringDType")
                    and isinstance(getattr(dtypes, n), type)]
    return allowed


def _result_file(path) -> Path:
    path = Path(path)
    return path / "attack_result.pt" if path.is_dir() else path


def _restricted_load(path: Path):
    """A PyTorch file's content through the restricted unpickler: tensors, number arrays, plain containers.

    A file naming a class or function to load is refused; a truncated, damaged or foreign file (the unpickler's
    and the zip reader's errors: EOFError, KeyError, struct.error, an unsupported pickle operand, ...) is one error
    saying so."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a file it fails on is an error
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if any(w in line for w in ("GLOBAL", "Unsupported", "Can only"))),
                      lines[-1] if lines else type(e).__name__).split(" Please use")[0]
        if not any(w in detail for w in DAMAGED_PICKLE):
            raise MapPruneError(f"refused {path}: it holds objects other than tensors, number arrays and plain "
                                f"containers ({detail}). mapprune never unpickles arbitrary objects; nothing in the "
                                "file was run") from None
        raise MapPruneError(f"cannot read {path}: it is truncated, damaged or not a file saved with torch.save "
                            f"({detail}); copy it again from BackdoorBench's record folder") from None
    except Exception as e:  # every reader error of a damaged file: zip, pickle, struct, key, EOF, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise MapPruneError(f"cannot read {path}: it is truncated, damaged or not a file saved with torch.save "
                            f"({detail}); copy it again from BackdoorBench's record folder") from None


def read_backdoorbench(path) -> dict:
    """The content of a BackdoorBench ``attack_result.pt`` (or a folder holding one), through the restricted
    unpickler. Refuses a file that holds anything but tensors, number arrays and plain containers."""
    path = _result_file(path)
    if not path.is_file():
        raise MapPruneError(f"{path} does not exist; give BackdoorBench's attack_result.pt or the folder holding it")
    data = _restricted_load(path)
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise MapPruneError(f"{path} is not a BackdoorBench attack result: expected the keys {list(REQUIRED)}, "
                            f"found {keys}")
    return data


def _poison_indices(data: dict) -> torch.Tensor:
    train = data.get("bd_train")
    if not train:
        return torch.zeros(0, dtype=torch.long)
    indicator = train.get("poison_indicator") if isinstance(train, dict) else None
    if indicator is None:
        raise MapPruneError("the attack result's bd_train has no poison_indicator; cannot tell which training "
                            "images were poisoned")
    return torch.nonzero(torch.as_tensor(indicator).flatten() > 0).flatten().long()


def wanet_grids(data: dict, path, grids=None) -> tuple[dict, Path]:
    """BackdoorBench's WaNet grids (identity_grid, noise_grid, as saved) and the file holding them: ``grids`` (a
    file the user names) if given, else the attack result ``data`` (read from ``path``) if it holds them, else the
    ``state_dict.pt`` beside it. Read through the same restricted unpickler; an error says where they were looked
    for."""
    result = _result_file(path)
    if grids is not None:
        source = Path(grids)
        if not source.is_file():
            raise MapPruneError(f"the WaNet grids file {source} does not exist")
        content = _restricted_load(source)
    elif any(k in data for k in WANET_GRIDS):
        source, content = result, data
    elif (result.parent / "state_dict.pt").is_file():
        source = result.parent / "state_dict.pt"
        content = _restricted_load(source)
    else:
        raise MapPruneError(f"WaNet's warping grids ({' and '.join(WANET_GRIDS)}) are neither in {result} nor in a "
                            f"state_dict.pt beside it: BackdoorBench's wanet.py saves them only in state_dict.pt, "
                            "written every frequency_save epochs (0, never, by default). Give the file holding them "
                            "with --attack-opt grids=FILE (a state_dict.pt, or BackdoorBench 1.x's <dataset>_<mode>_morph.pth.tar)")
    missing = [k for k in WANET_GRIDS if not isinstance(content, dict) or k not in content]
    if missing:
        found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise MapPruneError(f"{source} has no {' and no '.join(missing)} (BackdoorBench's WaNet grids); found {found}")
    return {k: content[k] for k in WANET_GRIDS}, source


def _wanet_grid(grids: dict, key: str, source, image_shape) -> torch.Tensor:
    """One saved grid as (H, W, 2) float32, checked: a tensor of shape (1, H, W, 2) (or (H, W, 2)), finite."""
    _, h, w = image_shape
    value = grids[key]
    want = f"(1, {h}, {w}, 2): BackdoorBench's {key} for {h}x{w} images"
    if not isinstance(value, torch.Tensor):
        raise MapPruneError(f"{key} in {source} is a {type(value).__name__}, not a tensor; expected {want}")
    if tuple(value.shape) not in ((1, h, w, 2), (h, w, 2)):
        raise MapPruneError(f"{key} in {source} has shape {tuple(value.shape)}; expected {want}")
    if not value.is_floating_point() or not torch.isfinite(value).all():
        raise MapPruneError(f"{key} in {source} must hold finite floats, got {value.dtype}"
                            + ("" if not value.is_floating_point() else " with NaN or infinite values"))
    return value.reshape(h, w, 2).float().contiguous()  # saved as permuted views


def _wanet_split(data: dict, flagged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """BackdoorBench's WaNet flags in bd_train's poison_indicator both the poisoned images and its noise-mode
    ("cross") images, which keep their labels. Split by the labels bd_train's container keeps per image (bd_label,
    label): (poisoned: relabelled, noise: label kept), or None where the container does not say."""
    train = data.get("bd_train")
    container = train.get("bd_data_container") if isinstance(train, dict) else None
    entries = container.get("data_dict") if isinstance(container, dict) else None
    if not isinstance(entries, dict):
        return None
    relabelled = []
    for i in flagged.tolist():
        entry = entries.get(i)
        info = entry.get("other_info") if isinstance(entry, dict) else entry[1:] if isinstance(entry, tuple) else None
        if not isinstance(info, (list, tuple)) or len(info) < 2:
            return None
        relabelled.append(int(info[0]) != int(info[1]))
    keep = torch.tensor(relabelled, dtype=torch.bool)
    return flagged[keep], flagged[~keep]


def _architecture(model_name: str) -> str:
    arch = MODELS.get(model_name)
    if arch is None:
        raise MapPruneError(f"BackdoorBench model {model_name!r} has no mapprune architecture yet; importable: "
                            f"{', '.join(MODELS)}")
    return arch


def backdoorbench_model(data: dict, dataset: str, path="attack_result.pt"):
    """BackdoorBench's model from its attack result ``data`` as a mapprune model (its input normalisation for
    ``dataset`` inside) and the model spec the run's manifest keeps. A model name without a mapprune
    architecture, or weights that do not fit it exactly (a missing, unexpected or misshapen tensor), is an error
    naming it."""
    name = str(data["model_name"])
    arch = _architecture(name)
    state = data["model"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MapPruneError("the attack result's 'model' is not a state dict of tensors")
    if all(str(k).startswith("module.") for k in state):  # trained under nn.DataParallel (several GPUs)
        state = {k[len("module."):]: v for k, v in state.items()}
    stem = STEM[arch]
    if stem not in state or state[stem].ndim != 4:
        raise MapPruneError(f"the attack result's weights have no {stem} (a 4-d conv weight): not BackdoorBench's "
                            f"{name}")
    mean, std = NORMALISATION[dataset]
    width, in_channels = (int(d) for d in state[stem].shape[:2])
    num_classes = data["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise MapPruneError(f"the attack result's num_classes is {num_classes!r}, not a number of classes: not "
                            "BackdoorBench's attack result, or a damaged one")
    spec = {"name": arch, "num_classes": num_classes, "width": width, "in_channels": in_channels,
            "mean": list(mean), "std": list(std)}
    model = create_model(arch, num_classes, width=width, in_channels=in_channels, mean=mean, std=std)
    load_state_into(model.net, state, path, what=f"BackdoorBench's {name}")
    return model, spec


def import_backdoorbench(path, out, *, attack: str, attack_kw: dict | None = None, target: int = 0,
                         data_dir=None, overwrite: bool = False, device=None) -> dict:
    """Writes a mapprune run folder at ``out`` from BackdoorBench's attack result at ``path``; returns the
    manifest. ``attack`` is BackdoorBench's attack (badnet, blended, sig, wanet), ``attack_kw`` its settings (for
    wanet also ``grids``: the file holding its grids, see ``wanet_grids``)."""
    name = ATTACK_NAMES.get(attack.lower())
    if name is None:
        raise MapPruneError(f"the {attack} trigger cannot be rebuilt from BackdoorBench's files (its test-time "
                            f"trigger is not in attack_result.pt); importable: {', '.join(sorted(ATTACK_NAMES))}")
    t0 = time.perf_counter()
    kw = dict(attack_kw or {})
    data = read_backdoorbench(path)
    grids = None
    if name == "wanet":
        if "field_seed" in kw:
            raise MapPruneError("field_seed does not apply to an imported WaNet: its field is BackdoorBench's saved "
                                "noise_grid")
        kw = {**WANET_DEFAULTS, **kw}
        grids, grids_file = wanet_grids(data, path, kw.pop("grids", None))
    kw = check_options(attack_class(name), kw, name)  # each setting of the type the attack takes
    _architecture(str(data["model_name"]))  # an unknown model before an unknown dataset
    dataset = str(data["clean_data"])
    if dataset not in NORMALISATION:
        raise MapPruneError(f"BackdoorBench dataset {dataset!r} is not one mapprune loads; known: "
                            f"{', '.join(NORMALISATION)}")
    model, spec = backdoorbench_model(data, dataset, Path(path))  # before the dataset: a bad file fails at once
    ds = load_dataset(dataset, data_dir)
    num_classes = spec["num_classes"]
    if num_classes != ds.num_classes:
        raise MapPruneError(f"the model has {num_classes} classes but {dataset} has {ds.num_classes}")
    if spec["in_channels"] != ds.image_shape[0]:
        raise MapPruneError(f"the model takes {spec['in_channels']}-channel images but {dataset}'s have "
                            f"{ds.image_shape[0]}")
    if grids is None:
        atk = create_attack(name, ds.image_shape, ds.num_classes, target=target, **kw)
    else:
        field = _wanet_grid(grids, "noise_grid", grids_file, ds.image_shape)
        identity = _wanet_grid(grids, "identity_grid", grids_file, ds.image_shape)
        atk = WaNet.from_grids(ds.image_shape, ds.num_classes, field, identity, target=target, **kw)
    poison = _poison_indices(data)
    if len(poison) and int(poison.max()) >= len(ds.y_train):
        raise MapPruneError(f"poison indices reach {int(poison.max())} but {dataset} has {len(ds.y_train)} training "
                            "images: the attack result is of another dataset split")
    imported = {"format": "backdoorbench", "path": str(Path(path).resolve()), "attack": attack,
                "model_name": str(data["model_name"]), "img_size": list(data.get("img_size") or [])}
    if grids is not None:
        imported["grids"] = {"file": str(grids_file.resolve()), "keys": list(WANET_GRIDS)}
        split = _wanet_split(data, poison)
        imported["noise_images"] = None if split is None else len(split[1])  # None: not told apart
        if split is not None:
            poison, atk.noise_indices = split
    writer = RunWriter(out, overwrite)
    dev = pick_device(device)
    metrics = evaluate(model.to(dev), atk.test_sets(ds.x_test, ds.y_test))
    manifest = {
        **save_run_files(writer, model, spec, atk, poison, ds, dataset),
        "train": {},
        "preset": None,
        "seed": None,
        "device": str(dev),
        "versions": versions(),
        "poison": {"count": len(poison), "file": "attack.safetensors:poison_indices"},
        "imported_from": imported,
        "timings": {"total_s": time.perf_counter() - t0},
        "metrics": metrics,
        "history": [],
    }
    write_json(writer.path("manifest.json"), manifest)
    writer.finish()
    return manifest
