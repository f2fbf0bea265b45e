"""Named training presets. Explicit command-line flags override a preset's values.

- ``paper``: BackdoorBench / FMT paper settings: PreActResNet18 width 64, 100 epochs, SGD lr 0.01, batch 128,
  cosine. For GPUs.
- ``cpu``: PreActResNet18 width 16 on CIFAR-10 in under 30 minutes on a 2-core CPU: 20 epochs, batch 128,
  one-cycle to lr 0.1 with nesterov momentum (a short schedule needs a larger peak learning rate).
- ``population``: the scan's calibration population, many models cheaply: width 8 (any of the CIFAR
  architectures), 8 epochs, batch 128, one-cycle to lr 0.1 with nesterov momentum. About 10 minutes a
  PreActResNet18 and 5 a VGG-16-BN on one core of an AVX2 CPU; a reduced preset, so the scan's figures on it
  are checked on full ``cpu``-preset models too.
- ``demo``: the small CNN on the embedded digits, seconds on a CPU.
- ``vit-cpu``: the small ViT (width 32: dim 64, 4 blocks) on CIFAR-10 on a CPU, about 2 minutes an epoch on one
  core: 30 epochs, batch 128, Adam one-cycle to lr 1e-3 (transformers train poorly with plain SGD at this length).
"""

PRESETS: dict[str, dict] = {
    "paper": {"model": "preactresnet18", "width": 64, "epochs": 100, "batch_size": 128, "lr": 0.01,
              "schedule": "cosine", "nesterov": False, "weight_decay": 5e-4},
    "cpu": {"model": "preactresnet18", "width": 16, "epochs": 20, "batch_size": 128, "lr": 0.1,
            "schedule": "onecycle", "nesterov": True, "weight_decay": 5e-4},
    "population": {"model": "preactresnet18", "width": 8, "epochs": 8, "batch_size": 128, "lr": 0.1,
                   "schedule": "onecycle", "nesterov": True, "weight_decay": 5e-4},
    "vit-cpu": {"model": "vit", "width": 32, "epochs": 30, "batch_size": 128, "lr": 1e-3, "optimizer": "adam",
                "schedule": "onecycle", "weight_decay": 5e-5},
    "demo": {"model": "smallcnn", "width": 32, "epochs": 12, "batch_size": 64, "lr": 0.05,
             "schedule": "onecycle", "nesterov": True, "weight_decay": 5e-4},
}
