"""Which router head kind ranks steps better, judged on training problems only.

Both kinds (`train-router --head mlp|linear`) are fitted on the problems of K-1 folds of the
train split's labelled problems and score the steps of the K-th; every step is scored once by
a fit that never saw its problem, and the pooled scores give each kind's AUROC and Spearman ρ
with the advantage. Both kinds run their full training recipe inside each fold (the MLP its
own validation split and early stopping, the linear head its nested cross-validation of the
penalty), so the comparison is of recipes, as `train-router` runs them. The difference's 95 %
interval resamples whole problems, paired (the same resamples for both kinds).

This is how the shipped head's kind is chosen: never on test problems, whose labels
`eval-router` reads only after the choice.

    python benchmarks/bench_router_heads.py --labels benchmarks/results/labels/qwen2.5-coder-gsm8k-t400 \\
        benchmarks/results/labels/qwen2.5-coder-math500-t400 --name router_heads_qwen_pair
    python benchmarks/bench_router_heads.py --render results/router_heads_qwen_pair.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _harness import RESULTS, add_render_flag, rendered, write_json  # noqa: E402

KINDS = ("mlp", "linear")


def load_labels(folders: list[Path]):
    """Every problem file of the label caches, one problem each, in file-name order."""
    from arbitrage_fast.router.data import RouterDataset

    files = [f for folder in folders for f in sorted(Path(folder).glob("*.safetensors"))]
    if not files:
        raise SystemExit(f"no label files in {', '.join(map(str, folders))}")
    return RouterDataset.concat([RouterDataset.load(f) for f in files]), len(files)


def out_of_fold_scores(data, hidden: int, folds: int, seed: int) -> dict[str, np.ndarray]:
    """Each kind's score of every step, from the fit on the other folds' problems."""
    from arbitrage_fast.router.train import problem_folds, train_linear_router, train_router

    scores = {k: np.full(len(data), np.nan) for k in KINDS}
    for fold in problem_folds(data, folds, seed):
        held = torch.isin(data.problem, fold)
        fit_on = data.subset(~held)
        heads = {"mlp": train_router(fit_on, hidden, seed=seed, progress=False)[0],
                 "linear": train_linear_router(fit_on, hidden, seed=seed)[0]}
        with torch.no_grad():
            for kind, head in heads.items():
                scores[kind][held.numpy()] = head(data.features[held]).numpy()
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", nargs="+", type=Path, default=[], help="label cache folders of train problems")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="router_heads")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    add_render_flag(p)
    args = p.parse_args(argv)
    if rendered(args, table):
        return 0
    if not args.labels:
        p.error("--labels is required (or --render)")
    from arbitrage_fast.eval.intervals import cluster_bootstrap
    from arbitrage_fast.router.features import hidden_size_of
    from arbitrage_fast.router.metrics import auroc, spearman

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data, n_problems = load_labels(args.labels)
    scores = out_of_fold_scores(data, hidden_size_of(data.features.shape[1]), args.folds, args.seed)
    labels, adv, problems = data.labels.numpy(), data.advantage.numpy(), data.problem.numpy()
    rows = []
    for kind in KINDS:
        s = scores[kind]
        rows.append({"kind": kind, "auroc": auroc(labels, s), "spearman": spearman(adv, s),
                     "auroc_ci": list(cluster_bootstrap(lambda i: auroc(labels[i], s[i]), problems)),
                     "spearman_ci": list(cluster_bootstrap(lambda i: spearman(adv[i], s[i]), problems))})
    lin, mlp = scores["linear"], scores["mlp"]
    payload = {
        "labels": [str(f) for f in args.labels], "n_problems": n_problems, "n_steps": len(data),
        "positive_rate": float(labels.mean()), "folds": args.folds, "seed": args.seed, "rows": rows,
        "linear_minus_mlp_auroc": auroc(labels, lin) - auroc(labels, mlp),
        "linear_minus_mlp_auroc_ci": list(cluster_bootstrap(
            lambda i: auroc(labels[i], lin[i]) - auroc(labels[i], mlp[i]), problems)),
        "seconds": time.perf_counter() - start,
    }
    path = write_json(payload, args.out_dir, f"{args.name}.json")
    print(table(payload))
    print(f"wrote {path}")
    return 0


def table(r: dict) -> str:
    lines = [f"{r['n_problems']} train problems, {r['n_steps']} steps ({100 * r['positive_rate']:.0f} % positive), "
             f"{r['folds']}-fold cross-validation over problems; 95 % intervals resample problems.", "",
             "| head | AUROC [95% CI] | Spearman ρ [95% CI] |", "|---|---|---|"]
    for row in r["rows"]:
        a, s = row["auroc_ci"], row["spearman_ci"]
        lines.append(f"| {row['kind']} | {row['auroc']:.3f} [{a[0]:.3f}, {a[1]:.3f}] | "
                     f"{row['spearman']:.3f} [{s[0]:.3f}, {s[1]:.3f}] |")
    d = r["linear_minus_mlp_auroc_ci"]
    lines += ["", f"linear − mlp AUROC: {r['linear_minus_mlp_auroc']:+.3f} [{d[0]:+.3f}, {d[1]:+.3f}]"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
