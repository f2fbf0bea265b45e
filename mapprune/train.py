"""The ONE training loop: attack training and every defense's fine-tune go through :func:`train`.

Data stays as uint8 tensors on the device; augmentation (random crop with 4-pixel padding, horizontal flip)
is done on whole batches. SGD with a cosine or one-cycle schedule, channels_last, autocast (bf16/fp16 on CUDA,
bf16 on CPUs that support it), a checkpoint after each epoch so an interrupted run resumes where it stopped.
"""

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import atomic_save, load_state_into, load_tensors
from .device import autocast
from .errors import MapPruneError

SCHEDULES = ("cosine", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # "cosine" (to min_lr), "onecycle" (linear warm-up, cosine down) or "constant"
    min_lr: float = 0.0
    warmup: float = 0.15  # fraction of steps warming up, onecycle only
    label_smoothing: float = 0.0
    augment: bool = True
    hflip: bool = True
    pad: int | None = None  # crop padding; None = 4 pixels per 32 (4 on CIFAR, 1 on 8x8 digits)
    amp: bool = True
    seed: int = 0
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov as set) or "adam" (i-BAU, SAU, NC's trigger search)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    freeze_bn: bool = False  # keep the model in eval mode while training (BatchNorm statistics frozen)

    def validate(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise MapPruneError(f"epochs must be >= 0 and batch size >= 1, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0:
            raise MapPruneError(f"learning rate must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise MapPruneError(f"unknown schedule {self.schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise MapPruneError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")

    def lr_at(self, step: int, total: int) -> float:
        if self.schedule == "constant":
            return self.lr
        t = step / max(1, total)
        if self.schedule == "onecycle":
            if t < self.warmup:
                return self.lr * (0.04 + 0.96 * t / self.warmup)
            t = (t - self.warmup) / (1 - self.warmup)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def augment_batch(x: torch.Tensor, pad: int, hflip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and optional horizontal flip of a float batch, all samples at once."""
    n, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * pad)
        xp = xp.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
        x = xp.gather(3, cols)
    if hflip:
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    return x


OPTIMIZER_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "step")  # what a checkpoint keeps (SGD, Adam)


def _save_checkpoint(path: Path, model, opt, epoch: int, history: list, g: torch.Generator, cfg: TrainConfig):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            # SGD keeps a momentum buffer per parameter; Adam its two moments and a step count.
            for key, buf in opt.state.get(p, {}).items():
                if isinstance(buf, torch.Tensor) and key in OPTIMIZER_STATE:
                    tensors[f"optim.{names[p]}" + ("" if key == "momentum_buffer" else f"@{key}")] = buf
    tensors["rng"] = g.get_state()
    atomic_save(tensors, path, {"epoch": epoch, "history": history, "config": asdict(cfg)})


def _load_checkpoint(path: Path, model, opt, g: torch.Generator, cfg: TrainConfig):
    tensors, meta = load_tensors(path)
    # A field added since the checkpoint was written counts as its default (older checkpoints stay resumable).
    def plain(d):  # as JSON stores it (tuples become lists)
        return json.loads(json.dumps(d))

    saved = {**plain(asdict(TrainConfig())), **meta.get("config", {})}
    if saved != plain(asdict(cfg)):
        raise MapPruneError(
            f"{path} is a checkpoint of a run with other training settings; delete it to start afresh "
            "or rerun with the settings it was made with"
        )
    load_state_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        if k.startswith("optim."):
            name, _, key = k[6:].partition("@")
            key = key or "momentum_buffer"
            if key not in OPTIMIZER_STATE:
                raise MapPruneError(f"{path} holds an unknown optimiser state {key!r}; delete it to start afresh")
            # Adam keeps its step count on the CPU; the moments live with the parameter.
            opt.state[params[name]][key] = v if key == "step" else v.to(params[name].device)
    g.set_state(tensors["rng"])
    return meta["epoch"], meta["history"]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    device: torch.device | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    eval_every: int = 1,
    checkpoint: Path | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    transform: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple] | None = None,
    parameters: list[torch.Tensor] | None = None,
    stop: Callable[[dict], bool] | None = None,
    before_epoch: Callable[[nn.Module, int], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict]:
    """Trains ``model`` in place on uint8 images ``x`` (N, C, H, W) and labels ``y``.

    Returns the per-epoch history (loss, train accuracy, lr, seconds, plus whatever ``eval_fn`` returns; it runs
    after every ``eval_every``-th epoch and after the last, since on a CPU it costs ~10% of an epoch).
    With ``checkpoint`` set, state is saved there after every epoch and a matching checkpoint is resumed.
    ``after_step`` runs after every optimiser step (FMT's persistent pruning mask uses it). ``loss_fn(logits,
    images, labels)`` replaces the cross-entropy (a defense's own objective: distillation, unlearning); it gets
    the augmented float batch the model saw. ``transform(images, labels, generator) -> (images, labels)``
    changes each augmented batch before the model sees it (FMT's unlearning stamps candidate triggers); it draws
    randomness from the loop's generator, so a resumed run stays reproducible. ``parameters``: what the
    optimiser updates (default: all of the model's; ANP and RNP train masks only). ``stop(record)`` ends
    training after an epoch whose record it accepts (RNP's unlearning stops at a low training accuracy).
    ``before_epoch(model, epoch)`` runs before each epoch (i-BAU recomputes its universal perturbation there).
    """
    cfg.validate()
    if eval_every < 1:
        raise MapPruneError(f"eval_every must be a positive number of epochs, got {eval_every}")
    if len(x) != len(y):
        raise MapPruneError(f"{len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise MapPruneError("no training images")
    device = device or next(model.parameters()).device
    model.to(device, memory_format=torch.channels_last)
    params = list(model.parameters() if parameters is None else parameters)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov and cfg.momentum > 0)
    g = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        start, history = _load_checkpoint(Path(checkpoint), model, opt, g, cfg)
    x_dev, y_dev = x.to(device), y.to(device)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    pad = cfg.pad if cfg.pad is not None else max(1, round(4 * x.shape[-1] / 32))
    total = steps_per_epoch * cfg.epochs
    bar = None
    if progress:
        bar = tqdm(total=total, initial=start * steps_per_epoch, desc=desc, unit="step", dynamic_ncols=True,
                   leave=False, mininterval=0.1 if sys.stderr.isatty() else 30)
    try:
        for epoch in range(start, cfg.epochs):
            if before_epoch is not None:
                before_epoch(model, epoch)
            model.train(not cfg.freeze_bn)
            t0 = time.perf_counter()
            perm = torch.randperm(len(x), generator=g).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                lr = cfg.lr_at(step, total)
                for group in opt.param_groups:
                    group["lr"] = lr
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                xb = x_dev[idx].float().div_(255)
                if cfg.augment:
                    xb = augment_batch(xb, pad, cfg.hflip, g)
                xb = xb.contiguous(memory_format=torch.channels_last)
                yb = y_dev[idx]
                if transform is not None:
                    xb, yb = transform(xb, yb, g)
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast(device, cfg.amp):
                    out = model(xb)
                    if loss_fn is None:
                        loss = F.cross_entropy(out, yb, label_smoothing=cfg.label_smoothing)
                    else:
                        loss = loss_fn(out, xb, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step(model)
                loss_sum += loss.detach() * len(idx)
                # an unlearning transform may append stamped copies: the epoch's accuracy counts the batch's own
                correct += (out.detach()[:len(idx)].argmax(1) == yb[:len(idx)]).sum()
                if bar is not None:
                    bar.update(1)
            if not torch.isfinite(loss_sum):
                raise MapPruneError(f"training diverged at epoch {epoch + 1} (loss is not finite); lower the learning rate")
            record = {"epoch": epoch + 1, "loss": loss_sum.item() / len(x), "train_acc": correct.item() / len(x),
                      "lr": lr, "seconds": time.perf_counter() - t0}
            if eval_fn is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs):
                record.update(eval_fn(model))
            history.append(record)
            if bar is not None:
                bar.set_postfix({k: round(v, 3) for k, v in record.items() if k in ("loss", "acc", "asr")})
            if checkpoint is not None:
                _save_checkpoint(Path(checkpoint), model, opt, epoch + 1, history, g, cfg)
            if stop is not None and stop(record):
                break
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return history
