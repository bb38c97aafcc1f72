"""The testbed tokenizer: a real byte-level BPE, trained on task text.

Why a real BPE rather than a character table: the engine must find step boundaries the way it
does for real models — as the set of token ids whose decoded text contains "\\n\\n" — and must
handle multi-character tokens such as " = " or ". Multiply by ". Two choices keep it learnable:
every digit is its own token (so a number's digits line up with place value), and "\\n\\n" is
cut out as a piece of its own before BPE, so the merges produce exactly one step-boundary token
that never swallows the first characters of the next step.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .task import STEP_SEPARATOR, TaskConfig, generate_problems

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2 in this order
DEFAULT_VOCAB_SIZE = 384


def _corpus(n_problems: int, seed: int, config: TaskConfig) -> list[str]:
    # Prompt and solution apart: they are always encoded apart, so a merge across the seam
    # ("result?\nA: Now") would be a token no model ever sees.
    return [text for p in generate_problems(n_problems, seed, "train", config) for text in (p.prompt, p.solution)]


def train_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    n_problems: int = 2000,
    seed: int = 0,
    config: TaskConfig = TaskConfig(),
) -> PreTrainedTokenizerFast:
    """Train the BPE on task text and wrap it for transformers.

    The task's word list is small, so BPE runs out of pairs to merge well before
    `vocab_size`; the resulting vocabulary is 256 byte symbols, the specials and the merges.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n\n"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(n_problems, seed, config), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama tokenizers, encoding a prompt prepends BOS; EOS is the model's to write.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def boundary_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids whose decoded text contains the step separator (the engine's boundary set)."""
    return [
        i for i in range(len(tokenizer)) if STEP_SEPARATOR in tokenizer.decode([i])
    ]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out
