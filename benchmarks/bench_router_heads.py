"""Which router head kind ranks steps better, judged on training problems only.

Both kinds (`train-router --head mlp|linear`) are fitted on the problems of K-1 folds of the
train split's labelled problems and score the steps of the K-th; every step is scored once by
a fit that never saw its problem, and the pooled scores give each kind's AUROC and Spearman ρ
with the advantage. Both kinds run their full training recipe inside each fold (the MLP its
own validation split and early stopping, the linear head its nested cross-validation of the
penalty), so the comparison is of recipes, as `train-router` runs them. The difference's 95 %
interval resamples whole problems, paired (the same resamples for both kinds).

This is how the shipped head's kind is chosen: never on test problems, whose labels
`eval-router` reads only after the choice. `--margins D ...` adds the linear recipe trained on
labels advantage > D instead of > 0 (every row is still judged against advantage > 0, the label
`eval-router` reports): a margin drops the steps the target would only slightly improve from the
positives. With several label folders each row also gives every folder's own AUROC.

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
    """Every problem file of the label caches, one problem each, in file-name order; with the
    number of problems and each step's folder (its index in `folders`)."""
    from arbitrage_fast.router.data import RouterDataset

    per_folder = [sorted(Path(folder).glob("*.safetensors")) for folder in folders]
    files = [f for group in per_folder for f in group]
    if not files:
        raise SystemExit(f"no label files in {', '.join(map(str, folders))}")
    data = RouterDataset.concat([RouterDataset.load(f) for f in files])
    folder_of_problem = np.repeat(np.arange(len(folders)), [len(group) for group in per_folder])
    return data, len(files), folder_of_problem[data.problem.numpy()]


def margin_kind(margin: float) -> str:
    return f"linear, advantage > {margin:g}"


def out_of_fold_scores(data, hidden: int, folds: int, seed: int,
                       margins: tuple[float, ...] = ()) -> dict[str, np.ndarray]:
    """Each kind's score of every step, from the fit on the other folds' problems."""
    from arbitrage_fast.router.train import problem_folds, train_linear_router, train_router

    kinds = KINDS + tuple(margin_kind(m) for m in margins)
    scores = {k: np.full(len(data), np.nan) for k in kinds}
    for fold in problem_folds(data, folds, seed):
        held = torch.isin(data.problem, fold)
        fit_on = data.subset(~held)
        heads = {"mlp": train_router(fit_on, hidden, seed=seed, progress=False)[0],
                 "linear": train_linear_router(fit_on, hidden, seed=seed)[0]}
        for m in margins:
            heads[margin_kind(m)] = train_linear_router(fit_on.with_margin(m), hidden, seed=seed)[0]
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
    p.add_argument("--margins", nargs="*", type=float, default=[],
                   help="also the linear recipe on labels advantage > each of these (> 0)")
    p.add_argument("--name", default="router_heads")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    add_render_flag(p)
    args = p.parse_args(argv)
    if rendered(args, table):
        return 0
    if not args.labels:
        p.error("--labels is required (or --render)")
    if any(m <= 0 for m in args.margins):
        p.error(f"--margins must be > 0 (0 is the linear row itself), got {args.margins}")
    from arbitrage_fast.eval.intervals import cluster_bootstrap
    from arbitrage_fast.router.features import hidden_size_of
    from arbitrage_fast.router.metrics import auroc, spearman

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data, n_problems, folder = load_labels(args.labels)
    scores = out_of_fold_scores(data, hidden_size_of(data.features.shape[1]), args.folds, args.seed,
                                tuple(args.margins))
    labels, adv, problems = data.labels.numpy(), data.advantage.numpy(), data.problem.numpy()
    rows = []
    for kind, s in scores.items():
        row = {"kind": kind, "auroc": auroc(labels, s), "spearman": spearman(adv, s),
               "auroc_ci": list(cluster_bootstrap(lambda i: auroc(labels[i], s[i]), problems)),
               "spearman_ci": list(cluster_bootstrap(lambda i: spearman(adv[i], s[i]), problems))}
        if len(args.labels) > 1:
            row["auroc_by_labels"] = [auroc(labels[folder == f], s[folder == f]) for f in range(len(args.labels))]
        rows.append(row)
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
    by_labels = "auroc_by_labels" in r["rows"][0]
    names = [Path(f).name for f in r["labels"]] if by_labels else []
    lines = [f"{r['n_problems']} train problems, {r['n_steps']} steps ({100 * r['positive_rate']:.0f} % positive), "
             f"{r['folds']}-fold cross-validation over problems; 95 % intervals resample problems; every "
             "AUROC against the label advantage > 0.", "",
             "| head | AUROC [95% CI] | Spearman ρ [95% CI] |" + "".join(f" AUROC, {n} |" for n in names),
             "|---|---|---|" + "---|" * len(names)]
    for row in r["rows"]:
        a, s = row["auroc_ci"], row["spearman_ci"]
        lines.append(f"| {row['kind']} | {row['auroc']:.3f} [{a[0]:.3f}, {a[1]:.3f}] | "
                     f"{row['spearman']:.3f} [{s[0]:.3f}, {s[1]:.3f}] |"
                     + "".join(f" {x:.3f} |" for x in row.get("auroc_by_labels", [])))
    d = r["linear_minus_mlp_auroc_ci"]
    lines += ["", f"linear − mlp AUROC: {r['linear_minus_mlp_auroc']:+.3f} [{d[0]:+.3f}, {d[1]:+.3f}]"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
