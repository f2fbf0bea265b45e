"""``mapprune diagnose RUN``: how well do feature-map scorers find the maps that really carry the backdoor?

An evaluation tool, never part of a defense: it uses the run's real trigger and its test split.

- Ground truth per feature map (every Conv2d channel): the **trigger response** (shift of the map's spatial
  mean and max between triggered and clean test images, in units of the clean spread) and the **causal effect**
  (ASR and ACC change when that one map is pruned the way FMT prunes: filter and consumer-BN gamma zeroed).
- **Scorers** under test (FMT's paper score and the target-concentration score, for each testing setting asked
  for) and a **random** ordering: AUROC against the ground-truth backdoor maps, precision and recall at the
  pruning budget, the seed-to-seed rank correlation of the scores.
- **Cumulative pruning curves** ASR(k), ACC(k) without fine-tuning, for every ordering including the oracle one.
- **Controls**: oracle-k and random-k pruning followed by the defenses' fine-tune (what any scorer can reach at
  this budget and fine-tune), and, run on a clean model, whether the scores see a backdoor at all.

Writes ``RUN/diagnose/diagnose.json``, ``curves.png`` and ``scores_vs_truth.png``; the ground truth is cached
in ``RUN/diagnose/ground_truth.safetensors`` so new scorers are cheap to add.
"""

import copy
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_save, load_tensors
from ..data import clean_subset
from ..defenses.base import pick_images
from ..defenses.pruning import PruneMask, conv_layers, following_batchnorms, prune
from ..defenses.scorers import estimate_target, layer_z, suspicion
from ..defenses.scoring import probe_feature_maps
from ..defenses.selection import select_rank
from ..errors import MapPruneError, MapPruneWarning
from ..metrics import evaluate, predict
from ..runs import load_run, read_result, write_json

# Testing settings a diagnosis compares by default: the paper's probe and the recommended recipe's patch probe.
DEFAULT_SETTINGS = {"paper": {"n_images": 32, "eps": 0.06, "objective": "mse"},
                    "patch": {"n_images": 32, "objective": "patch"}}


def flat_index(layers: dict[str, int]) -> list[tuple[str, int]]:
    """Every (conv name, channel) in a fixed order: layers in registration order, channels ascending."""
    return [(name, c) for name, width in layers.items() for c in range(width)]


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in d.values()])


# -- ground truth ------------------------------------------------------------------------------------------

@torch.inference_mode()
def map_statistics(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{conv name: (N, C, 2)}: each map's spatial mean and spatial max per uint8 image."""
    device = next(model.parameters()).device
    layers = conv_layers(model)
    stats = {name: [] for name in layers}
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: stats[name].append(
        torch.stack([o.float().mean((2, 3)), o.float().amax((2, 3))], -1).cpu())) for name, m in layers.items()]
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device).float().div_(255))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in stats.items()}


def trigger_response(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, torch.Tensor]:
    """{conv name: (C,)} the largest of |shift of the spatial mean| and |shift of the spatial max| between the
    triggered and clean images, each divided by its spread over the clean images (a z-score)."""
    was = model.training
    model.eval()
    a, b = map_statistics(model, clean), map_statistics(model, triggered)
    model.train(was)
    out = {}
    for name in a:
        sd = a[name].std(0).clamp_min(1e-6)
        z = (b[name].mean(0) - a[name].mean(0)) / sd  # (C, 2)
        out[name] = z.abs().amax(-1)
    return out


class SingleMapPruner:
    """Prunes one map at a time in place, exactly as FMT prunes (the same :class:`PruneMask` targets: filter, bias
    and consumer-BN gamma to zero), and puts it back."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        self.bns = following_batchnorms(model, example)

    @torch.no_grad()
    def ablate(self, name: str, channel: int) -> list:
        mask = PruneMask(self.model, {name: [channel]}, self.bns)
        saved = [(t, channel, t[channel].clone()) for t, _ in mask.targets]
        mask()
        return saved

    @torch.no_grad()
    def restore(self, saved: list) -> None:
        for t, channel, v in saved:
            t[channel] = v


def _rates(model, xc, yc, xt, yt) -> tuple[float, float]:
    """(ACC on the clean images, ASR on the triggered ones)."""
    acc = (predict(model, xc) == yc).double().mean().item()
    asr = (predict(model, xt) == yt).double().mean().item()
    return acc, asr


def causal_effect(model: nn.Module, xc, yc, xt, yt, progress: bool = False) -> dict[str, torch.Tensor]:
    """{conv name: (C, 2)}: (drop in ASR, drop in ACC) when that one map alone is pruned."""
    model.eval()
    pruner = SingleMapPruner(model, xc[:1].to(next(model.parameters()).device).float() / 255)
    acc0, asr0 = _rates(model, xc, yc, xt, yt)
    layers = conv_layers(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(m.out_channels for m in layers.values()), desc="ablating maps", unit="map", leave=False)
    out = {}
    for name, conv in layers.items():
        eff = torch.zeros(conv.out_channels, 2, dtype=torch.float64)
        for c in range(conv.out_channels):
            saved = pruner.ablate(name, c)
            acc, asr = _rates(model, xc, yc, xt, yt)
            pruner.restore(saved)
            eff[c] = torch.tensor([asr0 - asr, acc0 - acc])
            if bar is not None:
                bar.update(1)
        out[name] = eff
    if bar is not None:
        bar.close()
    return out


# -- orderings, curves, metrics ------------------------------------------------------------------------------

def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` (higher = positive) with average ranks for ties (Mann-Whitney)."""
    pos = positive.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores.double())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(s: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def ordering(values: torch.Tensor) -> list[int]:
    """Flat map indices, most suspicious first (ties by position, so orderings are deterministic)."""
    return torch.argsort(-values.double(), stable=True).tolist()


def as_pruned(index: list[tuple[str, int]], flat: list[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in flat:
        name, c = index[i]
        out.setdefault(name, []).append(c)
    return {k: sorted(v) for k, v in out.items()}


def pruning_curve(model: nn.Module, index, order: list[int], ks: list[int], xc, yc, xt, yt) -> list[dict]:
    """ACC and ASR after pruning the first k maps of ``order`` (no fine-tune), for each k."""
    pruner = SingleMapPruner(model, xc[:1].to(next(model.parameters()).device).float() / 255)
    saved, done, curve = [], 0, []
    try:
        for k in sorted(ks):
            for i in order[done:k]:
                saved += pruner.ablate(*index[i])
            done = max(done, k)
            acc, asr = _rates(model, xc, yc, xt, yt)
            curve.append({"k": k, "acc": acc, "asr": asr})
    finally:
        pruner.restore(saved[::-1])
    return curve


# -- the diagnosis ---------------------------------------------------------------------------------------------

def _evaluation_images(r, n: int, seed: int):
    """n clean test images (all classes) for ACC; n triggered non-target test images for ASR (test split only)."""
    d, atk = r.dataset, r.attack
    g = torch.Generator().manual_seed(seed)
    ic = torch.randperm(len(d.y_test), generator=g)[:n]
    keep = torch.arange(len(d.y_test)) if atk.all_to_all else torch.nonzero(d.y_test != atk.target).flatten()
    it = keep[torch.randperm(len(keep), generator=g)[:n]]
    xt = d.x_test[it]
    return d.x_test[ic], d.y_test[ic], xt, atk.apply(xt), atk.target_labels(d.y_test[it])


def ground_truth(model, r, n: int, seed: int, cache: Path | None, progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{"response": {conv: (C,)}, "effect": {conv: (C, 2)}}, read from ``cache`` when it matches (n, seed)."""
    if cache is not None and cache.is_file():
        tensors, meta = load_tensors(cache)
        if meta.get("n") == n and meta.get("seed") == seed:
            out = {"response": {}, "effect": {}}
            for k, v in tensors.items():
                kind, name = k.split(":", 1)
                out[kind][name] = v
            return out
    xc, yc, xt_clean, xt, yt = _evaluation_images(r, n, seed)
    response = trigger_response(model, xt_clean, xt)
    effect = causal_effect(model, xc, yc, xt, yt, progress=progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"response:{k}": v for k, v in response.items()} | {f"effect:{k}": v for k, v in effect.items()}
        atomic_save(tensors, cache, {"n": n, "seed": seed})
    return {"response": response, "effect": effect}


def _scorer_metrics(values: torch.Tensor, d_asr: torch.Tensor, causal: torch.Tensor, responsive: torch.Tensor,
                    budget: int) -> dict:
    top = torch.zeros(len(values), dtype=torch.bool)
    top[ordering(values)[:budget]] = True
    hits = int((top & causal).sum())
    return {"auroc_causal": auroc(values, causal), "auroc_response": auroc(values, responsive),
            f"precision@{budget}": hits / budget, f"recall@{budget}": hits / int(causal.sum()) if causal.any() else None,
            "spearman_d_asr": spearman(values, d_asr)}


def diagnose(model: nn.Module, r, *, settings: dict[str, dict] | None = None, seeds: tuple[int, ...] = (0,),
             n_eval: int = 256, budget: int = 25, ks: tuple[int, ...] = (0, 5, 10, 15, 25, 40, 60, 100, 150),
             clean_ratio: float = 0.1, causal_drop: float = 0.05, response_z: float = 3.0,
             controls: bool = False, cache: Path | None = None, progress: bool = True) -> dict:
    """Diagnoses ``model`` (the run's own, or a repaired one) against run ``r``'s real trigger; returns a dict
    (see the module docstring). ``settings``: {name: probe_feature_maps keywords plus ``n_images`` and
    ``balanced``}, each tested with every seed in ``seeds`` on the defender's clean subset of that seed."""

    settings = settings or DEFAULT_SETTINGS
    if budget < 1 or n_eval < 1 or not seeds:
        raise MapPruneError("budget and n_eval must be >= 1 and at least one seed is needed")
    device = next(model.parameters()).device
    model.eval()
    layers = {name: m.out_channels for name, m in conv_layers(model).items()}
    index = flat_index(layers)
    t0 = time.perf_counter()
    gt = ground_truth(model, r, n_eval, seeds[0], cache, progress)
    t_gt = time.perf_counter() - t0
    effect = _flat(gt["effect"]).view(-1, 2)
    response = _flat(gt["response"])
    causal = effect[:, 0] >= causal_drop
    responsive = response >= response_z
    xc, yc, _, xt, yt = _evaluation_images(r, n_eval, seeds[0])
    ks = sorted({k for k in ks if k <= len(index)} | {budget})
    acc0, asr0 = _rates(model, xc, yc, xt, yt)

    orderings: dict[str, torch.Tensor] = {
        "oracle-causal": effect[:, 0] + 1e-9 * response,
        "oracle-response": response,
        "random": torch.rand(len(index), generator=torch.Generator().manual_seed(seeds[0]), dtype=torch.float64),
    }
    scorer_info: dict[str, dict] = {}
    timings = {"ground_truth": t_gt}
    for sname, cfg in settings.items():
        cfg = dict(cfg)
        n_images, balanced = cfg.pop("n_images", 32), cfg.pop("balanced", False)
        per_seed: dict[str, list[torch.Tensor]] = {"accuracy": [], "target": []}
        targets = []
        t1 = time.perf_counter()
        for s in seeds:
            idx = clean_subset(r.dataset.y_train, clean_ratio, s)
            x, y = pick_images(r.dataset.x_train[idx], r.dataset.y_train[idx], n_images, s, balanced)
            test = probe_feature_maps(model, x.to(device), y.to(device), seed=s, keep_probs=True, progress=progress,
                                     **cfg)
            est = estimate_target(test)
            targets.append(est)
            per_seed["accuracy"].append(_flat(layer_z(suspicion(test, "accuracy"))))
            per_seed["target"].append(_flat(layer_z(suspicion(test, "target", est["target"]))))
            if s == seeds[0]:
                rank_set = select_rank(test.acc)
        timings[f"test:{sname}"] = (time.perf_counter() - t1) / len(seeds)
        for scorer, vals in per_seed.items():
            key = f"{sname}/{scorer}"
            orderings[key] = vals[0]
            info = {"setting": {"n_images": n_images, "balanced": balanced, **cfg}, "scorer": scorer,
                    "target_estimates": targets if scorer == "target" else None}
            if len(vals) > 1:
                info["seed_spearman"] = [spearman(vals[i], vals[j]) for i in range(len(vals))
                                         for j in range(i + 1, len(vals))]
            scorer_info[key] = info
        # The paper's own selection: the rank rule on raw accuracy, per layer.
        pr = sum(len(v) for v in rank_set.values())
        flat_rank = [i for i, (name, c) in enumerate(index) if c in rank_set.get(name, [])]
        pruned_curve = pruning_curve(model, index, flat_rank, [pr], xc, yc, xt, yt)[0]
        scorer_info[f"{sname}/accuracy"]["rank_rule"] = {"num_pruned": pr, "acc": pruned_curve["acc"],
                                                          "asr": pruned_curve["asr"],
                                                          "hits": int(causal[flat_rank].sum())}
    results = {}
    for key, vals in orderings.items():
        curve = pruning_curve(model, index, ordering(vals), ks, xc, yc, xt, yt)
        at_budget = next(c for c in curve if c["k"] == budget)
        results[key] = {**_scorer_metrics(vals, effect[:, 0], causal, responsive, budget), **scorer_info.get(key, {}),
                        f"asr@{budget}": at_budget["asr"], f"acc@{budget}": at_budget["acc"], "curve": curve}
    top2 = max(1, round(0.02 * len(index)))
    report = {
        "n_maps": len(index), "n_eval": n_eval, "budget": budget, "seeds": list(seeds),
        "before": {"acc": acc0, "asr": asr0},
        "ground_truth": {
            "causal_drop": causal_drop, "response_z": response_z,
            "n_causal": int(causal.sum()), "n_responsive": int(responsive.sum()),
            "overlap": int((causal & responsive).sum()),
            "concentration_top2pct": float(response.sort(descending=True).values[:top2].sum() / response.sum()),
            "top_causal": [{"layer": index[i][0], "channel": index[i][1], "d_asr": float(effect[i, 0]),
                            "d_acc": float(effect[i, 1]), "response": float(response[i])}
                           for i in ordering(effect[:, 0])[:15]],
        },
        "orderings": results,
        "timings": timings,
    }
    if controls:
        report["controls"] = finetune_controls(model, r, index, {"oracle": ordering(orderings["oracle-causal"]),
                                                                 "random": ordering(orderings["random"])},
                                               budget, seeds[0], clean_ratio, progress)
    report["_flat"] = {"effect": effect, "response": response, "orderings": orderings}
    return report


def finetune_controls(model, r, index, orders: dict[str, list[int]], budget: int, seed: int, clean_ratio: float,
                      progress: bool) -> dict:
    """Prune the first ``budget`` maps of each ordering, then the defenses' fine-tune with the mask on (FT's
    settings, the same clean subset); ACC / ASR / RA on the full test sets. Also plain FT for reference."""
    from ..defenses.ft import FineTune

    ft = FineTune(seed=seed, hflip=r.dataset.hflip, progress=progress)
    idx = clean_subset(r.dataset.y_train, clean_ratio, seed)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    device = next(model.parameters()).device
    test_sets = r.test_sets()
    out = {"ft": evaluate(ft.repair(model, x, y).model, test_sets)}
    for name, order in orders.items():
        m = copy.deepcopy(model)
        mask = prune(m, as_pruned(index, order[:budget]), x[:1].to(device).float() / 255)
        ft.finetune(m, x, y, after_step=mask, device=device)
        out[f"{name}-{budget}+ft"] = evaluate(m, test_sets)
    return out


def diagnose_run(run, *, defense: str | None = None, data_dir=None, device=None, settings=None, seeds=(0,),
                 n_eval: int = 256, budget: int = 25, controls: bool = False, progress: bool = True) -> dict:
    """Diagnoses a run folder's model (or ``RUN/defense/<defense>/``'s) and writes ``RUN/diagnose/``.

    Also scores every FMT result already in the run (``defense/*/result.json`` with per-map scores) as a
    further ordering, so past defenses are judged without being re-run.
    """
    from ..device import pick_device
    from ..runs import load_model_file

    run = Path(run)
    r = load_run(run, data_dir)
    model = r.model
    out = run / "diagnose" / (defense or "model")
    if defense is not None:
        path = run / "defense" / defense / "model.safetensors"
        if not path.is_file():
            raise MapPruneError(f"{path} does not exist; run `mapprune defend {defense} {run}` first")
        model = load_model_file(r.manifest, path)
    model = model.to(pick_device(device)).eval()
    report = diagnose(model, r, settings=settings, seeds=tuple(seeds), n_eval=n_eval, budget=budget,
                      controls=controls, cache=out / "ground_truth.safetensors", progress=progress)
    flat = report.pop("_flat")
    if defense is None:
        _add_saved_fmt_scores(run, model, r, report, flat, n_eval, budget, seeds[0])
    report["run"] = str(run)
    report["model"] = defense or "backdoored"
    write_json(out / "diagnose.json", report)
    save_diagnose_figures(out, report, flat)
    return report


def _add_saved_fmt_scores(run: Path, model, r, report: dict, flat: dict, n_eval: int, budget: int, seed: int) -> None:
    """Adds every saved FMT result's scores (accuracy per map) as an ordering named ``saved:<variant>``; a result
    that cannot be read is left out with a :class:`MapPruneWarning` naming it."""
    layers = {name: m.out_channels for name, m in conv_layers(model).items()}
    index = flat_index(layers)
    effect, response = flat["effect"], flat["response"]
    gt = report["ground_truth"]
    causal, responsive = effect[:, 0] >= gt["causal_drop"], response >= gt["response_z"]
    xc, yc, _, xt, yt = _evaluation_images(r, n_eval, seed)
    ks = [c["k"] for c in next(iter(report["orderings"].values()))["curve"]]
    for res in sorted((run / "defense").glob("*/result.json")):
        try:
            saved = read_result(res.parent, {"scores?": dict})
        except MapPruneError as e:
            warnings.warn(f"left out of the diagnosis: {e}", MapPruneWarning, stacklevel=2)
            continue
        scores = saved.get("scores") or {}
        if list(scores) != list(layers) or any(len(scores[n]) != layers[n] for n in layers):
            continue
        vals = _flat(layer_z({n: -torch.tensor(v, dtype=torch.float64) for n, v in scores.items()}))
        curve = pruning_curve(model, index, ordering(vals), ks, xc, yc, xt, yt)
        at = next(c for c in curve if c["k"] == budget)
        report["orderings"][f"saved:{res.parent.name}"] = {
            **_scorer_metrics(vals, effect[:, 0], causal, responsive, budget),
            f"asr@{budget}": at["asr"], f"acc@{budget}": at["acc"], "curve": curve}
        flat["orderings"][f"saved:{res.parent.name}"] = vals


def save_diagnose_figures(folder: Path, report: dict, flat: dict) -> None:
    """curves.png: ASR(k) and ACC(k) per ordering; scores_vs_truth.png: each scorer against the causal effect."""
    from ..report import _plt

    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, res in report["orderings"].items():
        ks = [c["k"] for c in res["curve"]]
        style = "--" if key.startswith(("oracle", "random")) else "-"
        a1.plot(ks, [100 * c["asr"] for c in res["curve"]], style, marker=".", label=key)
        a2.plot(ks, [100 * c["acc"] for c in res["curve"]], style, marker=".", label=key)
    for ax, what in ((a1, "ASR"), (a2, "ACC")):
        ax.axvline(report["budget"], color="grey", lw=0.8)
        ax.set_xlabel("maps pruned (no fine-tune)")
        ax.set_ylabel(f"{what} %")
        ax.set_ylim(0, 100)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=90)
    plt.close(fig)
    scorers = [k for k in flat["orderings"] if not k.startswith(("oracle", "random"))]
    if not scorers:
        return
    fig, axes = plt.subplots(1, len(scorers), figsize=(3.6 * len(scorers), 3.4), squeeze=False)
    d_asr = 100 * flat["effect"][:, 0]
    for ax, key in zip(axes[0], scorers):
        ax.scatter(flat["orderings"][key].tolist(), d_asr.tolist(), s=4, alpha=0.5)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("suspicion (within-layer z)")
        ax.set_ylabel("ASR drop when pruned alone (points)")
    fig.tight_layout()
    fig.savefig(folder / "scores_vs_truth.png", dpi=90)
    plt.close(fig)
