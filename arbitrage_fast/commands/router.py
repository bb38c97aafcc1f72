"""`train-router` and `eval-router`: advantage labels -> head -> metrics on held-out problems."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from arbitrage_fast.config import SamplingParams
from arbitrage_fast.router.features import hidden_size_of

from .common import build_engine, load_options, quant_info, write_json


def _datasets(preset, args) -> tuple[str, ...]:
    names = tuple(getattr(args, "dataset", None) or (preset.dataset,))
    if len(set(names)) != len(names):
        raise ValueError(f"--dataset names a dataset twice: {','.join(names)}")
    return names


def _labels(preset, args, split: str, n: int, seed: int):
    """Labels of `n` problems of `split` from each dataset, each dataset with its own cache."""
    from arbitrage_fast.eval.datasets import load_dataset
    from arbitrage_fast.router.data import LabelRun, label_problems

    names = _datasets(preset, args)
    cached_only = getattr(args, "cached_only", False)
    if cached_only and not args.label_cache:
        raise ValueError("--cached-only reads a label cache: pass --label-cache DIR")
    work = []  # (problems, cache) of each dataset
    for name in names:
        items = load_dataset(name, n=n, split=split, seed=seed, instruction=preset.instruction)
        cache = _label_cache(preset, args, name, len(names))
        if cached_only:
            items = [i for i in items if cache.path(i.id).is_file()]
        if items:
            work.append((items, cache))
    if not work:
        held = " that the label cache holds" if cached_only else ""
        raise ValueError(f"no {split} problems of {','.join(names)}{held} to label (n={n})")
    # The models load only when some problem still has to be labelled.
    missing = any(cache is None or not cache.path(i.id).is_file() for items, cache in work for i in items)
    engine = build_engine(preset, args.device, args.dtype, prm="label", router=False, max_batch=args.batch,
                          **load_options(args)) if missing else None
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    return LabelRun.join([
        label_problems(engine, [i.prompt for i in items], sampling, chat=preset.chat, ids=[i.id for i in items],
                       cache=cache, batch=args.batch) for items, cache in work])


def _label_cache(preset, args, dataset: str, n_datasets: int):
    """The `--label-cache` directory of `dataset`, keyed by everything a step's labels depend on.
    Several datasets need `{dataset}` in the path: a cache holds one dataset's labels."""
    from arbitrage_fast.router.label_cache import LabelCache

    if not args.label_cache:
        return None
    if n_datasets > 1 and "{dataset}" not in args.label_cache:
        raise ValueError("--label-cache needs '{dataset}' in its path when labelling several datasets "
                         f"(one cache each), got {args.label_cache!r}")
    return LabelCache(os.path.expanduser(args.label_cache.replace("{dataset}", dataset)), {
        "draft": preset.draft, "target": preset.target, "label_prm": str(preset.label_prm or "target-likelihood"),
        "dataset": dataset, "instruction": preset.instruction, "chat": preset.chat,
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype or preset.dtype, "device": args.device,
        **quant_info(args)})


def train(preset, args) -> dict:
    from arbitrage_fast.router.train import train_linear_router, train_router

    start = time.perf_counter()
    labels = _labels(preset, args, "train", args.n, args.seed)
    label_s = time.perf_counter() - start
    data = labels.data.with_margin(args.label_margin)
    hidden = hidden_size_of(data.features.shape[1])
    if args.head == "linear":
        head, report = train_linear_router(data, hidden_size=hidden, seed=args.seed)
    else:
        head, report = train_router(data, hidden_size=hidden, width=args.width, epochs=args.epochs, seed=args.seed,
                                    patience=args.patience)
    out = Path(args.out)
    summary = {
        "datasets": list(_datasets(preset, args)), "n_problems": labels.n_problems, "n_steps": len(data),
        "head": report.kind, "label_margin": data.margin, "penalty": report.penalty, "cv_auroc": report.cv_auroc,
        "positive_rate": report.positive_rate,
        "val_auroc": report.val_auroc, "val_spearman": report.val_spearman, "best_epoch": report.best_epoch,
        "stopped_epoch": report.stopped_epoch, "n_train_steps": report.n_train, "n_val_steps": report.n_val,
        "val_positives": report.val_positives, "val_deferral_curve": report.val_deferral, "curves": report.curves(),
        # labelling cost of these problems whenever they were labelled; this run's share beside it
        "label_seconds": sum(labels.seconds), "label_seconds_this_run": label_s,
        "problems_labelled_this_run": labels.labelled_now,
        "train_seconds": time.perf_counter() - start - label_s,
        "draft": preset.draft, "target": preset.target, "label_prm": preset.label_prm or "target-likelihood",
    }
    head.save(out, extra={"training": summary})
    data.save(out / "labels.safetensors")
    return summary


def evaluate(preset, args) -> dict:
    from arbitrage_fast.router.head import RouterHead
    from arbitrage_fast.router.metrics import auroc, deferral_curve, spearman

    if not preset.router:
        raise ValueError("eval-router needs a router head: pass --router DIR (or a preset that ships one)")
    run = _labels(preset, args, "test", args.n, args.seed)
    data = run.data.with_margin(args.label_margin)
    head = RouterHead.load(preset.router, expected_hidden_size=hidden_size_of(data.features.shape[1]))
    with torch.no_grad():
        scores = head(data.features).numpy()
    from arbitrage_fast.eval.intervals import cluster_bootstrap

    adv, labels, problems = data.advantage.numpy(), data.labels.numpy(), data.problem.numpy()
    prm = data.draft_prm.numpy()
    has_both = 0 < labels.sum() < len(labels)
    # 95% intervals resample whole problems (a problem's steps share a context).
    several = len(set(problems.tolist())) > 1
    curve = deferral_curve(adv, scores, draft_prm=prm)
    if several:
        for point in curve:
            _gain_intervals(point, adv, scores, prm, problems)
    return {
        "spearman": spearman(adv, scores),
        "spearman_ci": list(cluster_bootstrap(lambda i: spearman(adv[i], scores[i]), problems)) if several else None,
        "auroc": auroc(labels, scores) if has_both else None,
        "auroc_ci": (list(cluster_bootstrap(lambda i: auroc(labels[i], scores[i]), problems))
                     if has_both and several else None),
        "n_steps": len(data),
        "datasets": list(_datasets(preset, args)),
        "n_problems": run.n_problems,
        "positive_rate": float(labels.mean()),
        "label_margin": data.margin,
        "deferral_curve": curve,
        "router": preset.router,
    }


def _gain_intervals(point: dict, adv, scores, prm, problems) -> None:
    """95% intervals (whole problems resampled) of the advantage share the router's rule and
    RSD's rule capture at the point's rate, and of their difference: the same seed draws the
    same resamples for all three, so the difference is paired."""
    from arbitrage_fast.eval.intervals import cluster_bootstrap
    from arbitrage_fast.router.metrics import deferral_curve

    def gain(i, key):
        (p,) = deferral_curve(adv[i], scores[i], rates=(point["rate"],), draft_prm=prm[i])
        return p["router_gain"] - p["prm_gain"] if key == "difference" else p[key]

    for key, name in (("router_gain", "router_gain_ci"), ("prm_gain", "prm_gain_ci"),
                      ("difference", "router_minus_prm_ci")):
        point[name] = list(cluster_bootstrap(lambda i: gain(i, key), problems))


def run_train(preset, args) -> int:
    summary = train(preset, args)
    write_json(summary, getattr(args, "json", None))
    print(f"router saved to {args.out}: {summary['n_steps']} steps, val AUROC {summary['val_auroc']}, "
          f"val Spearman {summary['val_spearman']}")
    return 0


def run_eval(preset, args) -> int:
    result = evaluate(preset, args)
    write_json(result, args.json)
    print(f"router on {result['n_steps']} held-out steps: Spearman {result['spearman']:.3f}, AUROC {result['auroc']}")
    return 0
