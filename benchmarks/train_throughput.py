"""What does the training loop's data pipeline cost? Images/second of the training loop versus the bare model's
forward+backward on the same batches.

The data pipeline (uint8 -> float, batched random crop + flip, channels_last, indexing) may cost at most 10%:
printed as the ratio loop / bare. Both run in the same process, interleaved, to cancel machine noise.

    python benchmarks/train_throughput.py [--width 16] [--images 5120] [--batch-size 128] [--repeats 3] [--device auto]
"""

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from mapprune.device import autocast, pick_device
from mapprune.errors import MapPruneError
from mapprune.models import create_model
from mapprune.train import TrainConfig, train


def bare(model, batches, device, cfg):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    for xb, yb in batches:
        with autocast(device, cfg.amp):
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="preactresnet18", help="an architecture of the registry (10 classes)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--images", type=int, default=5120)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    args = ap.parse_args(argv)
    if min(args.width, args.images, args.batch_size, args.repeats) < 1:
        ap.error("--width, --images, --batch-size and --repeats must be >= 1")
    try:
        device = pick_device(args.device)
        model = create_model(args.model, 10, width=args.width).to(device, memory_format=torch.channels_last)
    except MapPruneError as e:
        ap.error(str(e))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.images,), generator=g)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01)
    # The bare loop gets ready-made float batches already on the device: no conversion, no augmentation.
    batches = [(x[i:i + args.batch_size].to(device).float().div(255).contiguous(memory_format=torch.channels_last),
                y[i:i + args.batch_size].to(device)) for i in range(0, args.images, args.batch_size)]
    train(model, x[: 4 * args.batch_size], y[: 4 * args.batch_size], cfg, progress=False)  # warm-up
    bare(model, batches[:4], device, cfg)
    loop_t, bare_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        train(model, x, y, cfg, device=device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        loop_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        bare(model, batches, device, cfg)
        bare_t.append(time.perf_counter() - t)
    lt, bt = min(loop_t), min(bare_t)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}")
    print(f"model {args.model} width {args.width}, batch {args.batch_size}, {args.images} images, best of {args.repeats}")
    print(f"training loop : {args.images / lt:8.1f} images/s")
    print(f"bare fwd+bwd  : {args.images / bt:8.1f} images/s")
    print(f"ratio loop/bare time: {lt / bt:.3f}  (data pipeline overhead {100 * (lt / bt - 1):+.1f}%, target <= +10%)")
    return {"loop_s": lt, "bare_s": bt}


if __name__ == "__main__":
    main()
