"""Train the testbed's neural PRM: `python -m arbitrage_fast.testbed.prm_train --out DIR`.

Why a learned PRM when the exact checker is free: the checker is perfect, so labels made with
it (router training) and decisions made with it (RSD) would both be oracles, and RSD would pay
nothing for its scores. A deployed RSD scores every draft step with a model that costs real time
and makes real mistakes, and the Arbitrage router learns from that same model's advantage. This
PRM is such a model: a 3-layer Llama (a fifth of the 16-layer target's cost per token, as a 1.5B
PRM is to an 8B target) with a value head, trained on train-split steps against the checker.
It ships in the value-head layout `prm.hf_prm.ValueHeadPRM` loads, so it is scored exactly as
any real PRM folder is.

What it learns from: the steps it will be asked about. Draft solutions (greedy, and sampled at
temperature 1 for more slips) scored by the checker, gold solutions (what the target writes),
and gold solutions with one step corrupted the way drafts err (a wrong digit, a wrong operand,
another operation, a wrong answer). The checker's graded scale {0, 0.25, 0.5, 1} is the soft
target of a binary cross-entropy at each step's last token, so the PRM's score speaks the
scale the exact PRM does. A language-model loss on the tokens of correct steps rides along:
checking "47 + 38 = 85" needs the sum, and predicting correct results is how a small model
learns it.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from .checker import CORRECT, check_step, split_steps
from .evaluate import generate_solutions
from .task import STEP_SEPARATOR, Problem, generate_problems
from .train import IGNORE_INDEX, ModelSpec, SHIPPED_TASK, TrainConfig, folder_bytes, llama_config, load_model, lr_at

PRM_SPEC = ModelSpec(3, 128, 384, 4, 2, tie_word_embeddings=True)
PRM_TRAIN = TrainConfig(steps=700, batch_size=64, lr=2e-3, warmup_steps=50)
LM_WEIGHT = 0.5  # the auxiliary loss on correct steps' tokens, beside the value head's


@dataclass(frozen=True)
class ScoredSolution:
    """A prompt and a solution cut into steps, each with the checker's score in its context."""

    prompt: str
    steps: tuple[str, ...]
    scores: tuple[float, ...]


def score_steps(problem: Problem, steps: list[str]) -> ScoredSolution:
    return ScoredSolution(problem.prompt, tuple(steps),
                          tuple(check_step(problem, steps[:i], s) for i, s in enumerate(steps)))


def corrupt_step(step: str, rng: random.Random) -> str:
    """One step changed the way a draft slips: a digit of the result or an operand changed,
    the operator flipped, or a plan's operand off by a digit. Steps with no digit stay."""
    body = step.removesuffix(STEP_SEPARATOR)
    positions = [i for i, c in enumerate(body) if c.isdigit()]
    if not positions:
        return step
    kind = rng.random()
    if kind < 0.15 and (" + " in body or " - " in body):
        body = body.replace(" + ", " - ", 1) if " + " in body else body.replace(" - ", " + ", 1)
    else:
        # The last number (a result, an answer, a plan's operand) is where drafts slip most.
        tail = [i for i in positions if i > body.rfind(" ")] if kind < 0.8 else positions
        i = rng.choice(tail or positions)
        digit = rng.choice([d for d in "0123456789" if d != body[i]])
        body = body[:i] + digit + body[i + 1:]
    return body + (STEP_SEPARATOR if step.endswith(STEP_SEPARATOR) else "")


def gold_with_slip(problem: Problem, rng: random.Random) -> ScoredSolution:
    """The gold solution with one step corrupted; the steps after it continue from the wrong
    value, as a draft's chain does (and the checker judges each step in its own context)."""
    steps = list(problem.steps)
    i = rng.randrange(len(steps))
    steps[i] = corrupt_step(steps[i], rng)
    return score_steps(problem, steps[: i + 1 + rng.randrange(len(steps) - i)])


@dataclass(frozen=True)
class EncodedSolution:
    """A scored solution and its token ids as training reads them (see `encode`)."""

    solution: ScoredSolution
    ids: list[int]
    ends: list[int]  # each step's last token
    labels: list[int]  # LM labels: the correct steps' tokens, IGNORE_INDEX elsewhere


def encode_all(tokenizer: PreTrainedTokenizerFast, solutions: list[ScoredSolution]) -> list[EncodedSolution]:
    """The solutions one forward can score every step of (see `encode`). A sampled draft can
    write a step of bare newlines, which the tokenizer merges with the separator before it;
    such solutions are left out of training (the counts go to the manifest)."""
    out = []
    for s in solutions:
        if not s.steps:
            continue
        try:
            out.append(EncodedSolution(s, *encode(tokenizer, s)))
        except ValueError:
            continue
    return out


def collect(draft: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, problems: list[Problem],
            draft_share: float, seed: int) -> list[EncodedSolution]:
    """`draft_share` of the problems solved by the draft (half greedy, half sampled), the rest
    half gold, half gold with a slip. Gold costs nothing to make, the draft's solutions a
    generation each, hence the share."""
    rng = random.Random(seed)
    n_draft = int(len(problems) * draft_share) // 2 * 2
    greedy, sampled, rest = problems[:n_draft // 2], problems[n_draft // 2:n_draft], problems[n_draft:]
    out = [score_steps(p, split_steps(t)) for p, t in zip(greedy, generate_solutions(draft, tokenizer, greedy))]
    torch.manual_seed(seed)
    out += [score_steps(p, split_steps(t)) for p, t in zip(sampled, _sampled_solutions(draft, tokenizer, sampled))]
    out += [score_steps(p, list(p.steps)) for p in rest[:len(rest) // 2]]
    out += [gold_with_slip(p, rng) for p in rest[len(rest) // 2:]]
    rng.shuffle(out)
    return encode_all(tokenizer, out)


@torch.no_grad()
def _sampled_solutions(model, tokenizer, problems: list[Problem], batch_size: int = 200) -> list[str]:
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts: list[str] = []
    try:
        for i in range(0, len(problems), batch_size):
            batch = tokenizer([p.prompt for p in problems[i:i + batch_size]], return_tensors="pt", padding=True)
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=160,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts.extend(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return texts


def encode(tokenizer: PreTrainedTokenizerFast, s: ScoredSolution) -> tuple[list[int], list[int], list[int]]:
    """Ids of the text ValueHeadPRM reads (prompt, newline, steps), the position of each step's
    last token, and LM labels on the tokens of correct steps only.

    The tokenizer cuts "\\n\\n" out as a piece of its own, so the ids of a prefix that ends at a
    step boundary are a prefix of the whole text's ids and one forward scores every step as
    `ValueHeadPRM` would score it alone (checked here, not assumed)."""
    head = s.prompt + "\n"
    ids = tokenizer(head)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    ends = []
    text = head
    for step, score in zip(s.steps, s.scores):
        text += step
        full = tokenizer(text)["input_ids"]
        if full[:len(ids)] != ids:
            raise ValueError(f"tokenisation of {text!r} is not prefix-stable at a step boundary")
        new = full[len(ids):]
        labels += new if score == CORRECT else [IGNORE_INDEX] * len(new)
        ids = full
        ends.append(len(ids) - 1)
    return ids, ends, labels


class PRMTrainer(torch.nn.Module):
    """A causal LM and its value head, trained together; what ships is the backbone and the head."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        self.lm = lm
        self.v_head = torch.nn.Linear(lm.config.hidden_size, 1)

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        h = out.last_hidden_state
        values = self.v_head(h[batch["rows"], batch["cols"]]).squeeze(-1)
        value_loss = F.binary_cross_entropy_with_logits(values, batch["targets"])
        logits = self.lm.lm_head(h)
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                  ignore_index=IGNORE_INDEX)
        return value_loss, lm_loss


def collate(encoded: list[EncodedSolution], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, e in enumerate(encoded):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        labels[r, :len(e.labels)] = torch.tensor(e.labels)
        mask[r, :len(e.ids)] = 1
        rows += [r] * len(e.ends)
        cols += e.ends
        targets += e.solution.scores
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "rows": torch.tensor(rows),
            "cols": torch.tensor(cols), "targets": torch.tensor(targets, dtype=torch.float32)}


def train_prm(data: list[EncodedSolution], tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig = PRM_TRAIN,
              progress: bool = True) -> tuple[PRMTrainer, list[float]]:
    torch.manual_seed(cfg.seed)
    model = PRMTrainer(LlamaForCausalLM(llama_config(PRM_SPEC, tokenizer)))
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    order = list(range(len(data)))
    rng = random.Random(cfg.seed)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), disable=not progress, desc="prm")
    cursor = len(order)
    for step in bar:
        if cursor + cfg.batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        pick = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        batch = collate([data[i] for i in pick], tokenizer.pad_token_id)
        for group in optim.param_groups:
            group["lr"] = lr_at(step, cfg)
        value_loss, lm_loss = model.losses(batch)
        loss = value_loss + LM_WEIGHT * lm_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        losses.append(value_loss.item())
        if step % 10 == 0:
            bar.set_postfix(value=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}", lm=f"{lm_loss.item():.3f}")
    model.eval()
    return model, losses


def save_prm(model: PRMTrainer, tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    """The value-head layout (prm/hf_prm.py): a causal-LM checkpoint and value_head.safetensors."""
    from .tokenizer import save_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    save_file({"v_head.weight": model.v_head.weight.detach().clone().contiguous(),
               "v_head.bias": model.v_head.bias.detach().clone().contiguous()}, str(out / "value_head.safetensors"))
    return out


def evaluate_prm(folder: Path, draft: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                 problems: list[Problem]) -> dict:
    """How well the shipped PRM separates the draft's wrong steps from its right ones on
    held-out problems (the steps RSD will score): AUROC, and accuracy at 0.5."""
    from arbitrage_fast.prm.hf_prm import load_prm
    from arbitrage_fast.router.metrics import auroc

    prm = load_prm(folder, batch_size=64)
    items, truth = [], []
    for p, text in zip(problems, generate_solutions(draft, tokenizer, problems)):
        steps = split_steps(text)
        for i, step in enumerate(steps):
            items.append((p.prompt, steps[:i], step))
            truth.append(check_step(p, steps[:i], step) == CORRECT)
    scores = torch.tensor(prm.score_batch(items))
    right = torch.tensor(truth)
    return {"problems": len(problems), "steps": len(items), "wrong_steps": int((~right).sum()),
            "auroc": round(float(auroc(right.float(), scores)), 4),
            "accuracy_at_0.5": round(float(((scores >= 0.5) == right).float().mean()), 4)}


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the checkpoints folder (holds draft/ and "
                        "manifest.json); the PRM is written to its prm/ subfolder")
    parser.add_argument("--problems", type=int, default=20000, help="train-split problems to learn from")
    parser.add_argument("--draft-share", type=float, default=0.2, help="of them, the share the draft solves")
    parser.add_argument("--steps", type=int, default=PRM_TRAIN.steps)
    parser.add_argument("--eval-problems", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.out / "draft")
    draft = load_model(args.out / "draft")
    began = time.perf_counter()
    # Offset from the models' own seed: the PRM learns from problems the pair was not trained on.
    data = collect(draft, tokenizer, generate_problems(args.problems, seed=args.seed + 1000, split="train",
                                                       config=SHIPPED_TASK), args.draft_share, args.seed)
    cfg = TrainConfig(**{**asdict(PRM_TRAIN), "steps": args.steps, "seed": args.seed})
    model, losses = train_prm(data, tokenizer, cfg)
    seconds = time.perf_counter() - began
    folder = save_prm(model, tokenizer, args.out / "prm")
    held_out = generate_problems(args.eval_problems, seed=args.seed, split="test", config=SHIPPED_TASK)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    steps = [v for s in data for v in s.solution.scores]
    manifest["prm"] = {
        "path": "prm", "spec": asdict(PRM_SPEC), "train": asdict(cfg), "lm_weight": LM_WEIGHT,
        "problems": args.problems, "draft_share": args.draft_share, "solutions": len(data), "steps": len(steps), "correct_share": round(sum(v == CORRECT for v in steps) / len(steps), 4),
        "train_seconds": round(seconds, 1), "final_value_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5),
        "folder_bytes": folder_bytes(folder), "eval_on_draft_steps": evaluate_prm(folder, draft, tokenizer, held_out),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest["prm"], indent=2))


if __name__ == "__main__":
    main()
