"""BackdoorBench interop: attack results written here in BackdoorBench's format become run folders; files holding
anything but tensors, number arrays and plain containers are refused without running."""

import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
    with pytest.raises(MapPruneError, match="inputaware trigger cannot be rebuilt"):
        import_backdoorbench(tmp_path, tmp_path / "run", attack="inputaware", data_dir=shared_data)
    with pytest.raises(MapPruneError, match="blend"):
        import_backdoorbench(tmp_path, tmp_path / "run", attack="blended", data_dir=shared_data,
                             attack_kw={"pattern": str(tmp_path / "no-kitty.png")})
    _bb_file(tmp_path / "dense.pt", model_name="densenet161")
    with pytest.raises(MapPruneError, match="'densenet161' has no mapprune architecture yet; importable: "
                                            "preactresnet18, resnet18, .*vgg19_bn"):
        import_backdoorbench(tmp_path / "dense.pt", tmp_path / "run", attack="badnet", data_dir=shared_data)
    _bb_file(tmp_path / "vgg.pt", model_name="vgg19_bn")  # PreActResNet18's weights under another name
    with pytest.raises(MapPruneError, match="no features.0.weight .*not BackdoorBench's vgg19_bn"):
        import_backdoorbench(tmp_path / "vgg.pt", tmp_path / "run", attack="badnet", data_dir=shared_data)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


# -- torchvision's architectures, as BackdoorBench builds them (generate_cls_model: torchvision's ImageNet
# constructors, only num_classes changed). The layouts and forwards below are written from torchvision's definition
# independently of mapprune.models.torchvision_bb, so a wrong layout or forward there fails here.
RESNETS = {"resnet18": (False, (2, 2, 2, 2)), "resnet34": (False, (3, 4, 6, 3)), "resnet50": (True, (3, 4, 6, 3))}
VGGS = {  # conv output channels in units of width, "M" = 2x2 max pooling; and whether each conv has a BatchNorm
    "vgg11": ((1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"), False),
    "vgg16": ((1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"), False),
    "vgg19": ((1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"), False),
    "vgg19_bn": ((1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"), True),
}
# torchvision's published parameter counts of the 1000-class ImageNet models
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "vgg11": 132_863_336,
                      "vgg16": 138_357_544, "vgg19": 143_667_240, "vgg19_bn": 143_678_248}
TV_NAMES = [*RESNETS, *VGGS]


def _layout(name, width, classes=10, cin=3) -> dict[str, tuple]:
    """Key -> shape of torchvision's ``name`` state dict (first stage ``width`` channels; 64 is torchvision's)."""
    out = {}

    def bn(key, c):
        out.update({f"{key}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})
        out[f"{key}.num_batches_tracked"] = ()

    if name in RESNETS:
        bottleneck, counts = RESNETS[name]
        expansion = 4 if bottleneck else 1
        out["conv1.weight"] = (width, cin, 7, 7)
        bn("bn1", width)
        c = width
        for stage, n in enumerate(counts):
            planes = width * 2 ** stage
            for b in range(n):
                key = f"layer{stage + 1}.{b}"
                if bottleneck:
                    out[f"{key}.conv1.weight"] = (planes, c, 1, 1)
                    out[f"{key}.conv2.weight"] = (planes, planes, 3, 3)
                    out[f"{key}.conv3.weight"] = (planes * 4, planes, 1, 1)
                    bn(f"{key}.bn1", planes), bn(f"{key}.bn2", planes), bn(f"{key}.bn3", planes * 4)
                else:
                    out[f"{key}.conv1.weight"] = (planes, c, 3, 3)
                    out[f"{key}.conv2.weight"] = (planes, planes, 3, 3)
                    bn(f"{key}.bn1", planes), bn(f"{key}.bn2", planes)
                if b == 0 and (stage > 0 or c != planes * expansion):
                    out[f"{key}.downsample.0.weight"] = (planes * expansion, c, 1, 1)
                    bn(f"{key}.downsample.1", planes * expansion)
                c = planes * expansion
        out["fc.weight"], out["fc.bias"] = (classes, c), (classes,)
        return out
    cfg, has_bn = VGGS[name]
    i, c = 0, cin
    for v in cfg:
        if v != "M":
            out[f"features.{i}.weight"], out[f"features.{i}.bias"] = (v * width, c, 3, 3), (v * width,)
            if has_bn:
                i += 1
                bn(f"features.{i}", v * width)
            i += 1  # the ReLU
            c = v * width
        i += 1
    hidden = 64 * width  # 4096 at torchvision's width
    for j, (o, n) in zip((0, 3, 6), ((hidden, c * 49), (hidden, hidden), (classes, hidden))):
        out[f"classifier.{j}.weight"], out[f"classifier.{j}.bias"] = (o, n), (o,)
    return out


def _random_state(layout, seed=0) -> dict[str, torch.Tensor]:
    """Random weights of that layout, scaled so that activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var") or (key.endswith(".weight") and len(shape) == 1):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[key] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        else:  # biases and running means
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def _reference_forward(name, s, x):
    """torchvision's forward (eval mode) of ``name`` with the weights ``s``, in plain functional calls."""
    def bn(h, key):
        return F.batch_norm(h, s[f"{key}.running_mean"], s[f"{key}.running_var"], s[f"{key}.weight"], s[f"{key}.bias"],
                            False, 0.0, 1e-5)

    if name in RESNETS:
        x = F.max_pool2d(F.relu(bn(F.conv2d(x, s["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
        for stage in range(1, 5):
            b = 0
            while f"layer{stage}.{b}.conv1.weight" in s:
                key, stride = f"layer{stage}.{b}", 2 if stage > 1 and b == 0 else 1
                if f"{key}.conv3.weight" in s:  # bottleneck: the stride is on the 3x3
                    h = F.relu(bn(F.conv2d(x, s[f"{key}.conv1.weight"]), f"{key}.bn1"))
                    h = F.relu(bn(F.conv2d(h, s[f"{key}.conv2.weight"], stride=stride, padding=1), f"{key}.bn2"))
                    h = bn(F.conv2d(h, s[f"{key}.conv3.weight"]), f"{key}.bn3")
                else:
                    h = F.relu(bn(F.conv2d(x, s[f"{key}.conv1.weight"], stride=stride, padding=1), f"{key}.bn1"))
                    h = bn(F.conv2d(h, s[f"{key}.conv2.weight"], padding=1), f"{key}.bn2")
                skip = x
                if f"{key}.downsample.0.weight" in s:
                    skip = bn(F.conv2d(x, s[f"{key}.downsample.0.weight"], stride=stride), f"{key}.downsample.1")
                x = F.relu(h + skip)
                b += 1
        return F.linear(x.mean((2, 3)), s["fc.weight"], s["fc.bias"])
    cfg, has_bn = VGGS[name]
    i = 0
    for v in cfg:
        if v == "M":
            x = F.max_pool2d(x, 2)
            i += 1
            continue
        x = F.conv2d(x, s[f"features.{i}.weight"], s[f"features.{i}.bias"], padding=1)
        if has_bn:
            i += 1
            x = bn(x, f"features.{i}")
        x = F.relu(x)
        i += 2
    x = F.adaptive_avg_pool2d(x, 7).flatten(1)
    x = F.relu(F.linear(x, s["classifier.0.weight"], s["classifier.0.bias"]))
    x = F.relu(F.linear(x, s["classifier.3.weight"], s["classifier.3.bias"]))
    return F.linear(x, s["classifier.6.weight"], s["classifier.6.bias"])


def _bb_content(name, state, num_classes=10):
    return {"model_name": name, "num_classes": num_classes, "model": state, "clean_data": "cifar10",
            "img_size": (32, 32, 3), "bd_test": {}}


@pytest.mark.parametrize("name", TV_NAMES)
def test_the_independent_layouts_are_torchvisions_and_the_registry_models_have_them(name):
    from mapprune.jobs.import_backdoorbench import MODELS as BB
    from mapprune.models import MODELS

    full = _layout(name, 64, classes=1000)
    learned = [s for k, s in full.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert sum(int(torch.tensor(s).prod()) for s in learned) == TORCHVISION_PARAMS[name]
    with torch.device("meta"):  # torchvision's width, without allocating VGG's 140M parameters
        net = MODELS[BB[name]](num_classes=1000, width=64)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == full


@pytest.mark.parametrize("name", TV_NAMES)
def test_backdoorbench_weights_give_backdoorbenchs_function(name):
    """Random weights in torchvision's layout import exactly: the imported model on [0, 1] pixels equals
    torchvision's forward on BackdoorBench's normalised input; the defenses find ordinary convs, BatchNorms and
    the classifier as the last nn.Linear."""
    from mapprune.defenses.fp import classifier_head
    from mapprune.jobs.import_backdoorbench import MODELS as BB
    from mapprune.jobs.import_backdoorbench import NORMALISATION, backdoorbench_model
    from mapprune.probes import following_batchnorms, map_layers

    layout = _layout(name, 4)
    state = _random_state(layout)
    model, spec = backdoorbench_model(_bb_content(name, state), "cifar10")
    model.eval()
    assert spec["name"] == BB[name] and spec["width"] == 4 and spec["in_channels"] == 3
    assert {k: tuple(v.shape) for k, v in model.net.state_dict().items()} == layout
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["cifar10"])
    with torch.no_grad():
        ref = _reference_forward(name, state, (x - mean) / std)
        assert ref.std() > 1e-3  # a comparison that means something
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    convs = [k[:-len(".weight")] for k, s in layout.items() if len(s) == 4]
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)] == [f"net.{c}" for c in convs]
    head = "fc" if name in RESNETS else "classifier.6"
    assert classifier_head(model)[0] == f"net.{head}" and f"net.{head}" not in map_layers(model)
    hidden = [] if name in RESNETS else ["net.classifier.0", "net.classifier.3"]  # FMT tests VGG's hidden Linears
    assert list(map_layers(model)) == [f"net.{c}" for c in convs] + hidden
    paired = following_batchnorms(model, x[:1])
    assert len(paired) == (len(convs) if name in RESNETS or VGGS[name][1] else 0)
    assert all(isinstance(dict(model.named_modules())[b], nn.BatchNorm2d) for b in paired.values())


def test_wrong_or_missing_weights_are_named():
    from mapprune.jobs.import_backdoorbench import backdoorbench_model

    def fails(name, state, match, num_classes=10):
        with pytest.raises(MapPruneError, match=match):
            backdoorbench_model(_bb_content(name, state, num_classes), "cifar10")

    good = _random_state(_layout("resnet18", 4))
    fails("resnet18", {k: v for k, v in good.items() if k != "layer3.0.downsample.1.running_var"},
          r"BackdoorBench's resnet18: 1 missing tensors \(e\.g\. layer3\.0\.downsample\.1\.running_var\)")
    fails("resnet18", {("linear.weight" if k == "fc.weight" else k): v for k, v in good.items()},
          r"missing tensors \(e\.g\. fc\.weight\); 1 unexpected tensors \(e\.g\. linear\.weight\)")
    fails("resnet18", good, r"shape mismatches \(e\.g\. fc\.weight: file \(10, 32\) vs .* \(43, 32\)\)",
          num_classes=43)
    fails("resnet18", _random_state(_layout("resnet34", 4)), r"unexpected tensors \(e\.g\. layer1\.2\.")
    vgg = _random_state(_layout("vgg19_bn", 4))
    fails("vgg19_bn", {k: v for k, v in vgg.items() if k != "features.0.weight"},
          "no features.0.weight .*not BackdoorBench's vgg19_bn")
    fails("vgg19", vgg, r"unexpected tensors \(e\.g\. features\.1\.bias\)")  # BatchNorms: it is vgg19_bn
    fails("vgg19_bn", {"features.0.weight": "not a tensor"}, "not a state dict of tensors")
    fails("mobilenet_v3_large", vgg, "'mobilenet_v3_large' has no mapprune architecture yet; importable: .*vgg19_bn")


def test_dataparallel_prefix_is_dropped():
    from mapprune.jobs.import_backdoorbench import backdoorbench_model

    state = _random_state(_layout("vgg11", 4))
    model, _ = backdoorbench_model(_bb_content("vgg11", {f"module.{k}": v for k, v in state.items()}), "cifar10")
    assert torch.equal(model.net.classifier[6].weight, state["classifier.6.weight"])


def test_defenses_run_on_the_imported_architectures():
    """FMT, FP, NC and FST on tiny resnet18-bb and vgg19_bn-bb: each completes and its model reloads strictly."""
    from mapprune.checkpoint import load_state_into
    from mapprune.defenses import create_defense
    from mapprune.models import create_model

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (80, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(10).repeat(8)
    settings = {"fmt": {"recipe": "paper", "n_images": 8, "batch_size": 32, "epochs": 1, "fraction": 1 / 8},
                "fp": {"batch_size": 32, "epochs": 1},
                "nc": {"reverse_epochs": 2, "n_images": 20, "epochs": 1, "batch_size": 32},
                "fst": {"epochs": 1, "batch_size": 32}}
    for arch in ("resnet18-bb", "vgg19_bn-bb"):
        for name, kw in settings.items():
            torch.manual_seed(0)
            result = create_defense(name, **kw).repair(create_model(arch, 10, width=4), x, y)
            load_state_into(create_model(arch, 10, width=4), result.model.state_dict(), f"{name} on {arch}")
            if name == "fmt":
                assert any(k.startswith("net.features." if "vgg" in arch else "net.layer") for k in result.pruned)


def test_import_of_a_vgg19_bn_result_writes_a_run_that_eval_reloads(tmp_path, shared_data, user_cache):
    from mapprune.cli import main
    from mapprune.jobs.import_backdoorbench import NORMALISATION
    from mapprune.runs import load_run

    state = _random_state(_layout("vgg19_bn", 4))
    content = {**_bb_content("vgg19_bn", state), "data_path": "./data/cifar10",
               "bd_train": {"poison_indicator": np.isin(np.arange(50000), [5, 6]).astype(np.int64)}}
    torch.save(content, tmp_path / "attack_result.pt")
    out = tmp_path / "run"
    assert main(["import-backdoorbench", str(tmp_path), "--out", str(out), "--attack", "sig", "--target", "2",
                 "--data-dir", str(shared_data), "--no-progress"]) == 0
    run = load_run(out)
    assert run.manifest["model"]["name"] == "vgg19_bn-bb" and run.manifest["imported_from"]["model_name"] == "vgg19_bn"
    assert run.poison_indices.tolist() == [5, 6] and run.attack.name == "sig"
    x = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["cifar10"])
    with torch.no_grad():
        torch.testing.assert_close(run.model.eval()(x), _reference_forward("vgg19_bn", state, (x - mean) / std),
                                   rtol=1e-4, atol=1e-5)
    assert main(["eval", str(out), "--json"]) == 0


# -- WaNet: BackdoorBench's saved warping grids ------------------------------------------------------------------
# Written from BackdoorBench's formulas (attack/wanet.py), independently of mapprune.attacks.wanet.

def _bb_grids(h=32, k=4, seed=1):
    """identity_grid and noise_grid as BackdoorBench's wanet.py makes and saves them: (1, h, h, 2) each, the noise
    grid a permuted (non-contiguous) view."""
    g = torch.Generator().manual_seed(seed)
    ctrl = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ctrl = ctrl / ctrl.abs().mean()
    noise_grid = F.interpolate(ctrl, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, h)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    return torch.stack((cols, rows), 2)[None], noise_grid


def _bb_warp(x, identity_grid, noise_grid, s, grid_rescale):
    """BackdoorBench's test-time WaNet on [0, 1] images: normalise, grid_sample (bilinear, zero padding,
    align_corners) at clamp((identity + s * noise / H) * grid_rescale, -1, 1), denormalise."""
    from mapprune.jobs.import_backdoorbench import NORMALISATION

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["cifar10"])
    grid = torch.clamp((identity_grid + s * noise_grid / x.shape[-2]) * grid_rescale, -1, 1)
    warped = F.grid_sample((x - mean) / std, grid.repeat(len(x), 1, 1, 1), mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    return warped * std + mean


def _wanet_bd_train(n_train=50000):
    """bd_train as BackdoorBench's WaNet saves it: poisoned (relabelled to 0) and noise-mode images (labels kept)
    all flagged, each with (bd_label, label) in the on-disk container."""
    labels = {3: (0, 5), 17: (0, 2), 40: (7, 7), 41: (3, 3)}
    indicator = np.zeros(n_train)
    indicator[list(labels)] = 1
    entries = {i: {"path": f"./record/w/bd_train_dataset/{lab}/{i}.png", "other_info": [bd, lab]}
               for i, (bd, lab) in labels.items()}
    return {"bd_data_container": {"save_folder_path": "./record/w/bd_train_dataset", "data_dict": entries,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.arange(n_train),
            "poison_indicator": indicator, "save_folder_path": "./record/w/bd_train_dataset"}


def _bb_state_dict(path, net, **grids):
    """state_dict.pt as BackdoorBench's wanet.py writes it every frequency_save epochs (MultiStepLR: a Counter)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [100, 200, 300, 400], 0.1)
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    assert isinstance(sched.state_dict()["milestones"], Counter)
    torch.save({"netC": net.state_dict(), "schedulerC": sched.state_dict(), "optimizerC": opt.state_dict(),
                "epoch_current": 0, **grids}, path)


def test_wanet_import_warps_with_backdoorbenchs_saved_grids(tmp_path, shared_data, user_cache):
    from mapprune.attacks.wanet import WaNet
    from mapprune.cli import main
    from mapprune.runs import load_run

    record = tmp_path / "record"
    record.mkdir()
    net = _bb_file(record / "attack_result.pt", bd_train=_wanet_bd_train())
    identity, noise = _bb_grids()
    _bb_state_dict(record / "state_dict.pt", net, identity_grid=identity, noise_grid=noise)
    out = tmp_path / "run"
    assert main(["import-backdoorbench", str(record), "--out", str(out), "--attack", "wanet", "--attack-opt", "s=1.5",
                 "--attack-opt", "grid_rescale=0.98", "--data-dir", str(shared_data), "--no-progress"]) == 0
    shutil.rmtree(record)  # the run needs nothing from BackdoorBench's folder any more
    run = load_run(out)
    m = run.manifest
    assert {k: m["attack"][k] for k in ("name", "s", "k", "grid_rescale", "cross_ratio", "field_seed", "target")} == \
        {"name": "wanet", "s": 1.5, "k": 4, "grid_rescale": 0.98, "cross_ratio": 2.0, "field_seed": None, "target": 0}
    assert m["imported_from"]["grids"]["file"].endswith("state_dict.pt")
    # the noise-mode images BackdoorBench flags too are told apart by their kept labels
    assert run.poison_indices.tolist() == [3, 17] and run.attack.noise_indices.tolist() == [40, 41]
    assert m["poison"]["count"] == 2 and m["imported_from"]["noise_images"] == 2
    x = run.dataset.x_test[:6]
    xf = x.float() / 255
    ref = _bb_warp(xf, identity, noise, 1.5, 0.98)
    assert (ref - xf).abs().max() > 0.1  # a warp that shows
    torch.testing.assert_close(run.attack.trigger(xf), ref, atol=1e-5, rtol=0)
    assert not torch.allclose(WaNet((3, 32, 32), 10, s=1.5, grid_rescale=0.98).trigger(xf), ref, atol=1e-2)
    # reloaded from the run folder alone: the same images as the attack built from the grids
    again = WaNet.from_grids((3, 32, 32), 10, noise[0], identity[0], s=1.5, grid_rescale=0.98)
    assert torch.equal(run.attack.apply(x), again.apply(x))
    # BackdoorBench stores its backdoor test images truncated to uint8, mapprune rounds: at most one level apart
    stored = (ref.clamp(0, 1) * 255).floor()
    assert ((run.attack.apply(x).float() - stored).abs() <= 1).all()
    assert main(["eval", str(out), "--json"]) == 0


def test_wanet_grids_in_the_attack_result_and_backdoorbenchs_defaults(tmp_path, shared_data, user_cache):
    from mapprune.jobs.import_backdoorbench import import_backdoorbench
    from mapprune.runs import load_run

    identity, noise = _bb_grids(seed=2)
    _bb_file(tmp_path / "attack_result.pt", identity_grid=identity, noise_grid=noise)  # save_attack_result(**kw)
    m = import_backdoorbench(tmp_path, tmp_path / "run", attack="wanet", data_dir=shared_data)
    assert {k: m["attack"][k] for k in ("s", "k", "grid_rescale", "cross_ratio")} == \
        {"s": 0.5, "k": 4, "grid_rescale": 1.0, "cross_ratio": 2.0}
    assert m["imported_from"]["grids"]["file"].endswith("attack_result.pt")
    assert m["imported_from"]["noise_images"] is None and m["poison"]["count"] == 3  # no labels to tell them apart
    run = load_run(tmp_path / "run")
    x = run.dataset.x_test[:4].float() / 255
    torch.testing.assert_close(run.attack.trigger(x), _bb_warp(x, identity, noise, 0.5, 1.0), atol=1e-5, rtol=0)


def test_wanet_without_usable_grids_is_refused_with_what_was_expected(tmp_path, shared_data, user_cache):
    from mapprune.jobs.import_backdoorbench import import_backdoorbench

    identity, noise = _bb_grids()

    def fails(match, **kw):
        with pytest.raises(MapPruneError, match=match):
            import_backdoorbench(tmp_path, tmp_path / "run", attack="wanet", data_dir=shared_data, **kw)

    net = _bb_file(tmp_path / "attack_result.pt")
    fails(r"grids \(identity_grid and noise_grid\) are neither in .*attack_result\.pt nor in a state_dict\.pt "
          r"beside it.*frequency_save.*--attack-opt grids=FILE")
    fails("grids file .*nowhere.pt does not exist", attack_kw={"grids": str(tmp_path / "nowhere.pt")})
    fails("field_seed does not apply", attack_kw={"field_seed": 3})
    _bb_state_dict(tmp_path / "state_dict.pt", net, noise_grid=noise)
    fails(r"state_dict\.pt has no identity_grid \(BackdoorBench's WaNet grids\); found \[.*'netC'")
    _bb_state_dict(tmp_path / "state_dict.pt", net, identity_grid=identity, noise_grid=noise[:, :16, :16])
    fails(r"noise_grid in .*state_dict\.pt has shape \(1, 16, 16, 2\); expected \(1, 32, 32, 2\)")
    _bb_state_dict(tmp_path / "state_dict.pt", net, identity_grid=identity.tolist(), noise_grid=noise)
    fails(r"identity_grid in .*state_dict\.pt is a list, not a tensor; expected \(1, 32, 32, 2\)")
    _bb_state_dict(tmp_path / "state_dict.pt", net, identity_grid=identity, noise_grid=noise * float("nan"))
    fails("noise_grid in .* must hold finite floats")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"identity_grid": identity, "noise_grid": Evil()}, tmp_path / "evil.pt")
    fails("refused .*evil.pt.*nothing in the file was run", attack_kw={"grids": str(tmp_path / "evil.pt")})
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_wanet_from_grids_keeps_the_seeded_wanet_as_it_was():
    from mapprune.attacks import create_attack
    from mapprune.attacks.wanet import WaNet

    seeded = create_attack("wanet", (3, 32, 32), 10)
    assert set(seeded.state()) == {"field", "noise_indices"} and seeded.params()["field_seed"] == 20210101
    given = WaNet.from_grids((3, 32, 32), 10, seeded.field)  # the seeded field, given: the same trigger
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(given.trigger(x), seeded.trigger(x)) and given.params()["field_seed"] is None
    with pytest.raises(MapPruneError, match=r"field must be finite floats of shape \(32, 32, 2\)"):
        WaNet.from_grids((3, 32, 32), 10, torch.zeros(1, 32, 32, 2))
    with pytest.raises(MapPruneError, match="no warping field"):
        WaNet((3, 32, 32), 10, field_seed=None).trigger(x)
