"""One-off: a universal perturbation towards SIG's target class, optimised on the clean subset only,
on the SIG model; its success rate and its cosine similarity with SIG's real pattern (evaluation only).

    python benchmarks/analysis/uap.py [TARGET]
"""
import sys

import torch

from mapprune.data.subset import clean_subset
from mapprune.runs import load_model_file, load_run

torch.set_num_threads(1)
torch.manual_seed(0)
sig = load_run("runs/cifar10-sig", "../shared/data")
idx = clean_subset(sig.dataset.y_train, 0.1, 0)
x = sig.dataset.x_train[idx].float() / 255
y = sig.dataset.y_train[idx]
xs = x[y != 0]
xt = sig.dataset.x_test[:2000].float() / 255
xt = xt[sig.dataset.y_test[:2000] != 0]
gray = torch.full((1, 3, 32, 32), 0.5)
pat = (sig.attack.trigger(gray) - gray)[0]
print("pattern linf", float(pat.abs().max()))
target = int(sys.argv[1]) if len(sys.argv) > 1 else 0
for name, path in [("sig", "runs/cifar10-sig/model.safetensors"), ("clean", "runs/cifar10-clean/model.safetensors")]:
    m = load_model_file(sig.manifest, path).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for eps in (0.03, 0.06, 0.1, 0.16):
        d = torch.zeros(1, 3, 32, 32, requires_grad=True)
        opt = torch.optim.Adam([d], lr=eps / 10)
        for _ in range(60):
            b = xs[torch.randint(len(xs), (128,))]
            z = m((b + d).clamp(0, 1))
            other = z.clone()
            other[:, target] = -1e9
            loss = (other.max(1).values - z[:, target]).clamp_min(-2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                d.clamp_(-eps, eps)
        with torch.no_grad():
            pred = m((xt + d).clamp(0, 1)).argmax(1)
            cos = torch.nn.functional.cosine_similarity(d.flatten(), pat.flatten(), 0)
        print(f"{name} eps {eps}: success {float((pred == target).float().mean()) * 100:.1f}%  "
              f"cos(d, sig pattern) {float(cos):.3f}", flush=True)
