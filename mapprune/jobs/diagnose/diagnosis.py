"""The diagnosis itself: every ordering of the maps (oracles, random, the scorers under each testing setting,
FMT results saved in the run) judged against the ground truth, the optional fine-tune controls, and the run-folder
job that writes ``RUN/diagnose/``."""

import copy
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ...data import clean_subset
from ...defenses.base import pick_images
from ...defenses.ft import FineTune
from ...defenses.pruning import prune
from ...defenses.selection import select_rank
from ...device import pick_device
from ...errors import MapPruneError, MapPruneWarning
from ...metrics import evaluate
from ...probes import conv_layers, estimate_target, layer_z, probe_feature_maps, suspicion
from ...runs import load_model_file, load_run, read_result, write_json
from .figures import save_diagnose_figures
from .orderings import as_pruned, ordering, pruning_curve, scorer_metrics, spearman
from .truth import evaluation_images, flat_index, flatten, ground_truth, rates

# Testing settings a diagnosis compares by default: the paper's probe and the recommended recipe's patch probe.
DEFAULT_SETTINGS = {"paper": {"n_images": 32, "eps": 0.06, "objective": "mse"},
                    "patch": {"n_images": 32, "objective": "patch"}}
# The keys a testing setting may hold: probe_feature_maps keywords plus ``n_images`` and ``balanced``.
SETTING_KEYS = ("n_images", "balanced", "eps", "alpha", "objective", "implementation", "batch_images")


def diagnose(model: nn.Module, r, *, settings: dict[str, dict] | None = None, seeds: tuple[int, ...] = (0,),
             n_eval: int = 256, budget: int = 25, ks: tuple[int, ...] = (0, 5, 10, 15, 25, 40, 60, 100, 150),
             clean_ratio: float = 0.1, causal_drop: float = 0.05, response_z: float = 3.0,
             controls: bool = False, cache: Path | None = None, progress: bool = True) -> dict:
    """Diagnoses ``model`` (the run's own, or a repaired one) against run ``r``'s real trigger; returns a dict
    (see :mod:`mapprune.jobs.diagnose`). ``settings``: {name: probe_feature_maps keywords plus ``n_images`` and
    ``balanced``}, each tested with every seed in ``seeds`` on the defender's clean subset of that seed."""

    settings = settings or DEFAULT_SETTINGS
    if budget < 1 or n_eval < 1 or not seeds:
        raise MapPruneError("budget and n_eval must be >= 1 and at least one seed is needed")
    model.eval()
    layers = {name: m.out_channels for name, m in conv_layers(model).items()}
    index = flat_index(layers)
    t0 = time.perf_counter()
    gt = ground_truth(model, r, n_eval, seeds[0], cache, progress)
    t_gt = time.perf_counter() - t0
    effect = flatten(gt["effect"]).view(-1, 2)
    response = flatten(gt["response"])
    causal = effect[:, 0] >= causal_drop
    responsive = response >= response_z
    xc, yc, _, xt, yt = evaluation_images(r, n_eval, seeds[0])
    ks = sorted({k for k in ks if k <= len(index)} | {budget})
    acc0, asr0 = rates(model, xc, yc, xt, yt)

    orderings: dict[str, torch.Tensor] = {
        "oracle-causal": effect[:, 0] + 1e-9 * response,
        "oracle-response": response,
        "random": torch.rand(len(index), generator=torch.Generator().manual_seed(seeds[0]), dtype=torch.float64),
    }
    scorer_info: dict[str, dict] = {}
    timings = {"ground_truth": t_gt}
    for sname, cfg in settings.items():
        t1 = time.perf_counter()
        setting, per_seed, targets, rank_set = _setting_scores(model, r, cfg, seeds, clean_ratio, progress)
        timings[f"test:{sname}"] = (time.perf_counter() - t1) / len(seeds)
        for scorer, vals in per_seed.items():
            key = f"{sname}/{scorer}"
            orderings[key] = vals[0]
            info = {"setting": setting, "scorer": scorer, "target_estimates": targets if scorer == "target" else None}
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
        results[key] = {**scorer_metrics(vals, effect[:, 0], causal, responsive, budget), **scorer_info.get(key, {}),
                        f"asr@{budget}": at_budget["asr"], f"acc@{budget}": at_budget["acc"], "curve": curve}
    report = {
        "n_maps": len(index), "n_eval": n_eval, "budget": budget, "seeds": list(seeds),
        "before": {"acc": acc0, "asr": asr0},
        "ground_truth": {"causal_drop": causal_drop, "response_z": response_z,
                         **_truth_summary(index, effect, response, causal, responsive)},
        "orderings": results,
        "timings": timings,
    }
    if controls:
        report["controls"] = finetune_controls(model, r, index, {"oracle": ordering(orderings["oracle-causal"]),
                                                                 "random": ordering(orderings["random"])},
                                               budget, seeds[0], clean_ratio, progress)
    report["_flat"] = {"effect": effect, "response": response, "orderings": orderings}
    return report


def _setting_scores(model: nn.Module, r, cfg: dict, seeds: tuple[int, ...], clean_ratio: float, progress: bool):
    """Tests the maps with one setting under every seed, on the defender's clean subset of that seed. Returns the
    setting as recorded, {scorer: per-seed within-layer z scores}, the per-seed target estimates, and the paper's
    rank rule's selection on the first seed."""
    cfg = dict(cfg)
    n_images, balanced = cfg.pop("n_images", 32), cfg.pop("balanced", False)
    device = next(model.parameters()).device
    per_seed: dict[str, list[torch.Tensor]] = {"accuracy": [], "target": []}
    targets = []
    for s in seeds:
        idx = clean_subset(r.dataset.y_train, clean_ratio, s)
        x, y = pick_images(r.dataset.x_train[idx], r.dataset.y_train[idx], n_images, s, balanced)
        test = probe_feature_maps(model, x.to(device), y.to(device), seed=s, keep_probs=True, progress=progress, **cfg)
        est = estimate_target(test)
        targets.append(est)
        per_seed["accuracy"].append(flatten(layer_z(suspicion(test, "accuracy"))))
        per_seed["target"].append(flatten(layer_z(suspicion(test, "target", est["target"]))))
        if s == seeds[0]:
            rank_set = select_rank(test.acc)
    return {"n_images": n_images, "balanced": balanced, **cfg}, per_seed, targets, rank_set


def _truth_summary(index, effect: torch.Tensor, response: torch.Tensor, causal: torch.Tensor,
                   responsive: torch.Tensor) -> dict:
    """How many maps carry the backdoor by each measure, how concentrated the response is (the top 2% of maps'
    share), and the 15 maps whose pruning drops ASR most."""
    top2 = max(1, round(0.02 * len(index)))
    return {
        "n_causal": int(causal.sum()), "n_responsive": int(responsive.sum()),
        "overlap": int((causal & responsive).sum()),
        "concentration_top2pct": float(response.sort(descending=True).values[:top2].sum() / response.sum()),
        "top_causal": [{"layer": index[i][0], "channel": index[i][1], "d_asr": float(effect[i, 0]),
                        "d_acc": float(effect[i, 1]), "response": float(response[i])}
                       for i in ordering(effect[:, 0])[:15]],
    }


def finetune_controls(model, r, index, orders: dict[str, list[int]], budget: int, seed: int, clean_ratio: float,
                      progress: bool) -> dict:
    """Prune the first ``budget`` maps of each ordering, then the defenses' fine-tune with the mask on (FT's
    settings, the same clean subset); ACC / ASR / RA on the full test sets. Also plain FT for reference."""
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
    xc, yc, _, xt, yt = evaluation_images(r, n_eval, seed)
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
        vals = flatten(layer_z({n: -torch.tensor(v, dtype=torch.float64) for n, v in scores.items()}))
        curve = pruning_curve(model, index, ordering(vals), ks, xc, yc, xt, yt)
        at = next(c for c in curve if c["k"] == budget)
        report["orderings"][f"saved:{res.parent.name}"] = {
            **scorer_metrics(vals, effect[:, 0], causal, responsive, budget),
            f"asr@{budget}": at["asr"], f"acc@{budget}": at["acc"], "curve": curve}
        flat["orderings"][f"saved:{res.parent.name}"] = vals
