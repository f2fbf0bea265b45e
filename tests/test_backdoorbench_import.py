"""BackdoorBench interop: attack results written here in BackdoorBench's format become run folders; files holding
anything but tensors, number arrays and plain containers are refused without running."""

import os

import numpy as np
import pytest
import torch

from mapprune.errors import MapPruneError
from mapprune.jobs.import_backdoorbench import read_backdoorbench
from mapprune.models.preactresnet import PreActResNet18


def _bb_file(path, *, poisoned=(3, 17, 40), n_train=50000, **over):
    """An attack_result.pt as BackdoorBench's save_attack_result writes it (its PreActResNet18, no final BN)."""
    torch.manual_seed(0)
    net = PreActResNet18(10, width=4, final_bn=False)
    indicator = np.zeros(n_train, dtype=np.int64)
    indicator[list(poisoned)] = 1
    content = {
        "model_name": "preactresnet18", "num_classes": 10, "model": net.state_dict(), "data_path": "./data/cifar10",
        "img_size": (32, 32, 3), "clean_data": "cifar10",
        "bd_train": {"bd_data_container": {"data_dict": {3: (np.zeros((32, 32, 3), np.uint8), 0)}},
                     "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.arange(n_train),
                     "poison_indicator": indicator, "save_folder_path": "./record/x"},
        "bd_test": {"poison_indicator": np.ones(9000, dtype=np.int64), "original_index_array": np.arange(9000)},
        **over,
    }
    torch.save(content, path)
    return net


def test_the_restricted_reader_accepts_arrays_and_refuses_code(tmp_path):
    _bb_file(tmp_path / "attack_result.pt")
    data = read_backdoorbench(tmp_path)  # the folder works too
    assert data["bd_train"]["poison_indicator"].sum() == 3 and data["model_name"] == "preactresnet18"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model_name": "preactresnet18", "model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MapPruneError, match="refused .*nothing in the file was run"):
        read_backdoorbench(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    torch.save({"model_name": "x", "bd_train": np.array([object()], dtype=object)}, tmp_path / "objects.pt")
    with pytest.raises(MapPruneError, match="refused"):
        read_backdoorbench(tmp_path / "objects.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(MapPruneError, match="not a BackdoorBench attack result"):
        read_backdoorbench(tmp_path / "other.pt")
    with pytest.raises(MapPruneError, match="does not exist"):
        read_backdoorbench(tmp_path / "missing")


def test_import_writes_a_run_that_eval_reloads(tmp_path, shared_data, user_cache):
    from mapprune.cli import main
    from mapprune.jobs.import_backdoorbench import NORMALISATION
    from mapprune.runs import load_run

    net = _bb_file(tmp_path / "attack_result.pt").eval()
    out = tmp_path / "run"
    assert main(["import-backdoorbench", str(tmp_path), "--out", str(out), "--attack", "badnet",
                 "--data-dir", str(shared_data), "--no-progress"]) == 0
    run = load_run(out)
    assert run.poison_indices.tolist() == [3, 17, 40] and run.manifest["model"]["name"] == "preactresnet18-bb"
    x = torch.rand(4, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["cifar10"])
    with torch.no_grad():  # the same function as BackdoorBench's model on its normalised input
        torch.testing.assert_close(run.model(x), net((x - mean) / std))
    assert run.attack.name == "badnets" and run.manifest["imported_from"]["attack"] == "badnet"
    assert main(["eval", str(out), "--json"]) == 0


def test_import_says_what_it_cannot_rebuild(tmp_path, shared_data, user_cache):
    from mapprune.jobs.import_backdoorbench import import_backdoorbench

    _bb_file(tmp_path / "attack_result.pt")
    with pytest.raises(MapPruneError, match="wanet trigger cannot be rebuilt"):
        import_backdoorbench(tmp_path, tmp_path / "run", attack="wanet", data_dir=shared_data)
    with pytest.raises(MapPruneError, match="blend"):
        import_backdoorbench(tmp_path, tmp_path / "run", attack="blended", data_dir=shared_data,
                             attack_kw={"pattern": str(tmp_path / "no-kitty.png")})
    _bb_file(tmp_path / "vgg.pt", model_name="vgg19_bn")
    with pytest.raises(MapPruneError, match="vgg19_bn"):
        import_backdoorbench(tmp_path / "vgg.pt", tmp_path / "run", attack="badnet", data_dir=shared_data)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
