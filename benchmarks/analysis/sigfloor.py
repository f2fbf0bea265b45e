"""One-off: SIG's trigger on models that never learnt it (the floor of SIG's ASR), and per-class recall."""
import torch

from mapprune.metrics import evaluate
from mapprune.runs import load_model_file, load_run

torch.set_num_threads(1)
sig = load_run("runs/cifar10-sig", "../shared/data")
ts = sig.test_sets()
for name, path in [("sig undefended", "runs/cifar10-sig/model.safetensors"),
                   ("sig fmt s0", "runs/cifar10-sig/defense/fmt/model.safetensors"),
                   ("sig ft", "runs/cifar10-sig/defense/ft/model.safetensors"),
                   ("clean model", "runs/cifar10-clean/model.safetensors"),
                   ("clean fmt", "runs/cifar10-clean/defense/fmt/model.safetensors"),
                   ("badnets undefended", "runs/cifar10-badnets/model.safetensors"),
                   ("blended fmt", "runs/cifar10-blended/defense/fmt/model.safetensors")]:
    m = load_model_file(sig.manifest, path)
    r = evaluate(m, ts, num_classes=10)
    per_class = " ".join(f"{a * 100:.0f}" for a in r["class_acc"])
    print(f"{name:20s} acc {r['acc'] * 100:.2f} asr {r['asr'] * 100:.2f} ra {r['ra'] * 100:.2f} "
          f"class_acc {per_class}", flush=True)
