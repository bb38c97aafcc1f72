"""Random-weight models of real shapes, built straight on the target device.

Speed depends on a model's shape, not on what its weights have learnt, so benchmarks time
random weights of published shapes (Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-1.5B/7B) without
downloading anything. The decoder is laid out on the meta device, cast, then materialised
once on the target device in the target dtype and filled in place: no fp32 copy, no host
copy, an 8B model in about a second on a GPU.

Random weights cannot write text, so the tokenizer is a stand-in (`SyntheticTokenizer`)
that answers exactly what the engine asks of a tokenizer. None of its tokens contains a
blank line, so a step only ends at `max_step_tokens` (or EOS when EOS is not ignored):
step lengths in a benchmark are exactly what it asks for.
"""
from __future__ import annotations

import torch

from .architecture import DecoderSpec
from .llama import LlamaDecoder
from .loader import LoadedModel, resolve_dtype


def config_from_dict(fields: dict):
    """A transformers config object from `config.json` fields (model_type picks the class)."""
    from transformers import AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


class SyntheticTokenizer:
    """The slice of the transformers tokenizer API the engine uses, for random-weight models.

    Ids below 256 are byte tokens (so any text encodes), the rest render as " t<id>"; BOS/EOS
    sit where the real vocabulary puts them. Decoding is not the inverse of encoding beyond
    bytes, which no benchmark needs.
    """

    def __init__(self, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | list | None = None) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        eos = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = vocab_size - 1 if eos is None else int(eos)
        self.pad_token_id = None
        self._special = {i: s for i, s in ((bos_token_id, "<s>"), (self.eos_token_id, "</s>")) if i is not None}
        for i in self._special:
            if not 0 <= i < vocab_size:
                raise ValueError(f"special token id {i} is outside the vocabulary [0, {vocab_size})")

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special)

    def _piece(self, i: int) -> str:
        if i in self._special:
            return self._special[i]
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return f"<0x{i:02X}>" if i < 256 else f"\u2581t{i}"

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._piece(ids)
        return [self._piece(int(i)) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return {self._piece(i): i for i in range(self.vocab_size)}

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        if isinstance(ids, int):
            ids = [ids]
        out, pending = [], bytearray()
        for i in map(int, ids):
            if i < 256 and i not in self._special:
                pending.append(i)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if i in self._special:
                if not skip_special_tokens:
                    out.append(self._special[i])
            else:
                self._piece(i)  # range check
                out.append(f" t{i}")
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **_) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b % self.vocab_size for b in text.encode("utf-8")]
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def apply_chat_template(self, messages, tokenize: bool = True, add_generation_prompt: bool = False, **_):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return self.encode(text) if tokenize else text


@torch.no_grad()
def random_model(config, device: str | torch.device = "cpu", dtype: str | torch.dtype = "bfloat16",
                 seed: int = 0, std: float = 0.02, tokenizer=None, name: str | None = None) -> LoadedModel:
    """A `LoadedModel` of `config`'s shape with N(0, std) weights, unit norms and zero biases.

    `config` is a transformers config object or a dict of `config.json` fields. On the meta
    device nothing is allocated (parameter counting). The tokenizer defaults to a
    `SyntheticTokenizer` of the config's vocabulary; pass one object to several models to
    pair them in an Engine cheaply.
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    spec = DecoderSpec.from_hf_config(config)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlamaDecoder(spec)
    model = model.to(torch_dtype).to_empty(device=device)
    if spec.tie_word_embeddings:  # materialising gives each module its own tensor: tie again
        model.lm_head.weight = model.embed_tokens.weight
    if device.type != "meta":
        gen = torch.Generator(device=device).manual_seed(seed)
        for pname, p in model.named_parameters():  # tied weights are listed once
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            elif pname.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
    model.rotary.inv_freq = spec.inv_freq.to(device)
    if tokenizer is None:
        tokenizer = SyntheticTokenizer(spec.vocab_size, getattr(config, "bos_token_id", None),
                                       getattr(config, "eos_token_id", None))
    label = name or getattr(config, "name_or_path", "") or spec.architecture
    return LoadedModel(model=model.eval().requires_grad_(False), spec=spec, tokenizer=tokenizer,
                       hf_config=config, path=f"random:{label}")
