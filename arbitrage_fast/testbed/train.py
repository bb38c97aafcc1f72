"""Train the testbed's draft and target models: `python -m arbitrage_fast.testbed.train --out DIR`.

Why two models from one recipe: the engine's whole subject is the gap between a cheap draft
that errs on some steps and an expensive target that rarely does. Both are plain
`LlamaForCausalLM`s, so the engine's native Llama path and transformers can both load them,
and both learn the same task from the same stream of problems; only size (and so the share of
steps they get wrong, and their cost per token) differs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .evaluate import compare_latency, evaluate_accuracy
from .task import Problem, TaskConfig, generate_problems
from .tokenizer import save_tokenizer, train_tokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one role; the rest of LlamaConfig comes from the tokenizer."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Role:
    """A model to ship: its architecture, its training, and the dtype its weights are saved in
    (bf16 halves the target's folder; the engine upcasts on load)."""

    spec: ModelSpec
    train: TrainConfig
    save_dtype: str = "float32"


ROLES: dict[str, Role] = {
    # Same width, eight times the depth: at batch 1 on a CPU a token's cost grows with depth,
    # so the target costs about seven drafts per token through the engine, as a 1B/8B pair
    # does. The target ships in bf16 (half the folder; the engine and `load_model` upcast).
    # The draft's budget is where it still slips on about one step in twenty (5.4 %): trained
    # twice as long it makes no errors at all on this task, and a third shorter it fails half
    # the problems (measured at 1000, 1600 and 3000 steps).
    "draft": Role(
        ModelSpec(2, 128, 384, 4, 2, tie_word_embeddings=True),
        TrainConfig(steps=1600, lr=2e-3),
    ),
    "target": Role(
        ModelSpec(16, 128, 384, 4, 2, tie_word_embeddings=False),
        TrainConfig(steps=1200, lr=2e-3, warmup_steps=100),
        save_dtype="bfloat16",
    ),
}

# Not shipped: a target three times deeper (48 layers, 19 MB in bf16), trained on demand into
# the cache by `benchmarks/testbed_deep.sh`. With the shipped target, RSD's cheapest matched
# point costs only 2.4 drafts, which caps any router's lead over RSD there; this one costs
# three times as much per token (17.5 drafts per problem, about a 0.5B/8B pair's size ratio)
# and keeps the same recipe.
BENCHMARK_ROLES: dict[str, Role] = {
    "target-48l": Role(
        ModelSpec(48, 128, 384, 4, 2, tie_word_embeddings=False),
        TrainConfig(steps=1200, lr=2e-3, warmup_steps=100),
        save_dtype="bfloat16",
    ),
}

# The shipped pair's task: the default difficulty, with plan steps (see task.py).
SHIPPED_TASK = TaskConfig(plan_steps=True)


def llama_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_dropout=0.0,
    )


def encode(tokenizer: PreTrainedTokenizerFast, problem: Problem) -> tuple[list[int], list[int]]:
    """Token ids of prompt + solution + EOS, and labels that score only the solution: the
    prompt is given, never predicted, so spending capacity on it would be waste."""
    prompt = tokenizer(problem.prompt).input_ids
    answer = tokenizer(problem.solution, add_special_tokens=False).input_ids
    answer.append(tokenizer.eos_token_id)
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped_batches(
    problems: list[Problem], batch_size: int, rng: random.Random, pool_batches: int = 16
) -> list[list[Problem]]:
    """Batches of similar-length problems, in a shuffled order.

    Solutions run from three to six steps, so a random batch pads its short rows by up to
    half; sorting within pools of `pool_batches` batches removes most of that waste on a
    CPU-bound budget, while the shuffle keeps long and short batches interleaved over training.
    """
    batches: list[list[Problem]] = []
    pool = pool_batches * batch_size
    for i in range(0, len(problems), pool):
        chunk = sorted(problems[i : i + pool], key=lambda p: len(p.prompt) + len(p.solution))
        group = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        rng.shuffle(group)
        batches.extend(group)
    return batches


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_model(
    spec: ModelSpec,
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerFast,
    task: TaskConfig = TaskConfig(),
    progress: bool = True,
) -> tuple[LlamaForCausalLM, list[float]]:
    """Train one model from scratch on a fresh stream of train-split problems.

    Every problem is seen once (the task is unbounded), so the loss is a held-out loss in
    all but name and the model cannot memorise its way to accuracy.
    """
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(spec, tokenizer))
    model.train()
    problems = generate_problems(cfg.steps * cfg.batch_size, seed=cfg.seed, split="train", config=task)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), disable=not progress, desc=f"{spec.num_hidden_layers}L/{spec.hidden_size}")
    batches = length_grouped_batches(problems, cfg.batch_size, random.Random(cfg.seed))
    for step in bar:
        batch = collate([encode(tokenizer, p) for p in batches[step]], tokenizer.pad_token_id)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(**batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    model.eval()
    return model, losses


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path, dtype: str) -> Path:
    """Write an HF folder; weights in `dtype` (config.json records it), the caller's model
    untouched (a copy is cast, so an fp32 model is not silently rounded to bf16)."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    return out


def load_model(path: str | Path) -> LlamaForCausalLM:
    """Load a shipped folder in fp32 whatever dtype its weights were stored in."""
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write one subfolder per role and manifest.json")
    parser.add_argument("--seed", type=int, default=0)
    trainable = {**ROLES, **BENCHMARK_ROLES}
    parser.add_argument("--roles", nargs="+", default=list(ROLES), choices=list(trainable))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every role's step count")
    parser.add_argument("--eval-problems", type=int, default=200)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    task = SHIPPED_TASK
    tokenizer = train_tokenizer(seed=args.seed, config=task)
    eval_problems = generate_problems(args.eval_problems, seed=args.seed, split="test", config=task)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update({"seed": args.seed, "task": asdict(task), "vocab_size": len(tokenizer)})
    manifest.setdefault("roles", {})
    for name in args.roles:
        role = trainable[name]
        cfg = TrainConfig(**{**asdict(role.train), "seed": args.seed,
                             "steps": max(1, round(role.train.steps * args.steps_scale))})
        began = time.perf_counter()
        model, losses = train_model(role.spec, cfg, tokenizer, task)
        train_seconds = time.perf_counter() - began
        folder = save_model(model, tokenizer, args.out / name, role.save_dtype)
        shipped = load_model(folder)  # measure what ships, after any bf16 round trip
        metrics = evaluate_accuracy(shipped, tokenizer, eval_problems)
        manifest["roles"][name] = {
            "path": name,
            "spec": asdict(role.spec),
            "train": asdict(cfg),
            "weights_dtype": role.save_dtype,
            "parameters": sum(p.numel() for p in shipped.parameters()),
            "train_seconds": round(train_seconds, 1),
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5),
            "folder_bytes": folder_bytes(folder),
            "eval": metrics,
        }
        print(f"{name}: {json.dumps(manifest['roles'][name]['eval'])} in {train_seconds:.0f}s", flush=True)
    if all((args.out / r).exists() for r in ROLES):
        models = {r: load_model(args.out / r) for r in ROLES}
        latency = compare_latency(models, tokenizer, eval_problems[0].prompt)
        manifest["latency_threads"] = torch.get_num_threads()
        manifest["latency_ms_per_token"] = {r: round(v * 1e3, 3) for r, v in latency.items()}
        manifest["latency_ratio_target_over_draft"] = round(latency["target"] / latency["draft"], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: v for k, v in manifest.items() if k != "task"}, indent=2))


if __name__ == "__main__":
    main()
