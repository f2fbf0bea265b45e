"""How fast is FMT's testing phase? ``reference`` (per-map loop) vs ``fast`` (maps batched) vs the floor.

The floor is the same number of image passes with none of FMT's bookkeeping: per layer, forward to the layer
and backward on plain batches of n x maps images, then a full inference forward on as many images.

A full reference run at width 64 on a CPU takes most of an hour, so per layer the script times the first
``--maps`` maps (the same maps for all three) and extrapolates to all maps of the layer by the per-map time;
``--all`` times every map instead. Peak memory is printed (CUDA allocator peak, or the process's max RSS).

    python benchmarks/fmt_speed.py [--widths 64 16] [--n 32] [--maps 32] [--ref-maps 4] [--all] [--device auto]
"""

import argparse
import platform
import time

import torch

from mapprune.device import peak_memory_mb, pick_device
from mapprune.errors import MapPruneError
from mapprune.models import create_model
from mapprune.probes import conv_layers, layer_output, score_feature_maps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor(model, layer, x, maps, batch_images):
    """Plain batches: the same image passes as FMT's testing of ``maps`` maps, with nothing else."""
    n = len(x)
    chunk = max(1, batch_images // n)
    for c0 in range(0, maps, chunk):
        k = min(chunk, maps - c0)
        xb = x.repeat(k, 1, 1, 1).requires_grad_(True)
        (g,) = torch.autograd.grad(layer_output(model, layer, xb).square().mean(), xb)
        with torch.inference_mode():
            model((xb.detach() + g.sign() * 0.01).clamp_(0, 1)).argmax(1)


def timed(device, fn, *args):
    sync(device)
    t = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--maps", type=int, default=32, help="maps timed per layer (extrapolated to all)")
    ap.add_argument("--ref-maps", type=int, default=4, help="maps timed per layer for the reference loop")
    ap.add_argument("--all", action="store_true", help="time every map (slow for reference at width 64)")
    ap.add_argument("--layer-stride", type=int, default=1, help="time every Nth conv layer only (totals cover those)")
    ap.add_argument("--batch-images", type=int, default=1024)
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    args = ap.parse_args(argv)
    if min([args.n, args.maps, args.ref_maps, args.layer_stride, args.batch_images, *args.widths]) < 1:
        ap.error("--widths, --n, --maps, --ref-maps, --layer-stride and --batch-images must be >= 1")
    try:
        device = pick_device(args.device)
    except MapPruneError as e:
        ap.error(str(e))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}")
    results = {}
    for width in args.widths:
        torch.manual_seed(0)
        model = create_model("preactresnet18", 10, width=width).to(device, memory_format=torch.channels_last).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        x = torch.rand(args.n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.n,), device=device)
        layers = dict(list(conv_layers(model).items())[:: args.layer_stride])
        total = {"reference": 0.0, "fast": 0.0, "floor": 0.0}
        score_feature_maps(model, x, y, layers=[next(iter(layers))], batch_images=args.batch_images)  # warm-up
        for name, layer in layers.items():
            c = layer.out_channels
            k_fast = c if args.all else min(c, args.maps)
            k_ref = c if args.all else min(c, args.ref_maps)
            t_fast = timed(device, _score_some, model, x, y, name, k_fast, "fast", args.batch_images)
            t_ref = timed(device, _score_some, model, x, y, name, k_ref, "reference", args.batch_images)
            t_floor = timed(device, floor, model, layer, x, k_fast, args.batch_images)
            total["fast"] += t_fast / k_fast * c
            total["reference"] += t_ref / k_ref * c
            total["floor"] += t_floor / k_fast * c
        maps = sum(m.out_channels for m in layers.values())
        how = "all maps timed" if args.all else f"{args.maps} maps/layer timed ({args.ref_maps} for reference), extrapolated"
        print(f"\nPreActResNet18 width {width}: {len(layers)} conv layers timed (stride {args.layer_stride}), {maps} maps "
              f"in them, n={args.n} ({how})")
        for k, v in total.items():
            print(f"  {k:9s}: {v:9.2f} s  ({1000 * v / maps:7.3f} ms/map)")
        print(f"  fast vs reference: {total['reference'] / total['fast']:.2f}x faster (target >= 3x on CPU at width 64)")
        print(f"  fast vs floor    : {total['fast'] / total['floor']:.2f}x the floor's time (target <= 1.5x)")
        print(f"  peak memory so far: {peak_memory_mb(device):.0f} MB")
        results[width] = {"maps": maps, **total}
    return results


def _score_some(model, x, y, name, k, implementation, batch_images):
    """Scores the first k maps of one layer through the public function."""
    return score_feature_maps(model, x, y, layers=[name], implementation=implementation,
                              batch_images=batch_images, max_maps=k)


if __name__ == "__main__":
    main()
