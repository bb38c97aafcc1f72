"""Tiny random PRM checkpoints for tests, built on the spot (no hub access).

The checkpoints are random, so their scores mean nothing; what the tests check
is the plumbing: folder layout, tokenisation, which position is read, and that
our loader agrees with the raw Hugging Face model. The tokenizer is a real
byte-level BPE trained on a handful of sentences, so "\\n\\n", digits and the
step separator behave like they do in real vocabularies.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForTokenClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForTokenClassification,
)

STEP_SEPARATOR = "<extra_0>"

_CORPUS = [
    "Janet has 16 eggs. She eats 3 and bakes with 4.\n\n",
    "So she sells 16 - 3 - 4 = 9 eggs.\n\n",
    "Each egg costs 2 dollars, so she makes 9 * 2 = 18 dollars.\n\n",
    "The answer is \\boxed{18}.",
    "Let x be the number of apples. Then 2x + 5 = 11, so x = 3.\n\n",
    "We compute 12 + 30 = 42 and 42 / 6 = 7.\n\n",
]

# A minimal ChatML-like template, enough to exercise the chat-formatting path.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `_CORPUS`; BOS is prepended like Llama's tokenizer does."""
    specials = ["<pad>", "<s>", "</s>", STEP_SEPARATOR, "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=[STEP_SEPARATOR, "<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def _config_kwargs(tok: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_value_head_prm(folder: str | Path, seed: int = 0, with_bias: bool = True) -> Path:
    """Write a causal-LM checkpoint plus `value_head.safetensors` (the value-head layout)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(**_config_kwargs(tok))).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    hidden = model.config.hidden_size
    head = {"v_head.weight": torch.randn(1, hidden)}
    if with_bias:
        head["v_head.bias"] = torch.randn(1)
    save_file(head, str(folder / "value_head.safetensors"))
    return folder


def build_token_classification_prm(folder: str | Path, seed: int = 0, arch: str = "llama") -> Path:
    """Write a 2-label token-classification checkpoint (the Qwen2.5-Math-PRM layout)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    if arch == "llama":
        model = LlamaForTokenClassification(LlamaConfig(num_labels=2, **_config_kwargs(tok)))
    elif arch == "qwen2":
        model = Qwen2ForTokenClassification(Qwen2Config(num_labels=2, **_config_kwargs(tok)))
    else:
        raise ValueError(f"unknown tiny PRM arch {arch!r}; expected 'llama' or 'qwen2'")
    # Random init leaves the classifier near zero; scale it so scores spread over (0, 1).
    with torch.no_grad():
        model.score.weight.mul_(10.0)
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
