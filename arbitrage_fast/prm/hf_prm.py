"""PRMs loaded from local Hugging Face folders, in the two layouts real PRMs ship in.

**Value-head layout** (as Skywork's PRMs): transformers has no standard class for
it, so this project fixes one precisely. The folder holds

* a standard causal-LM checkpoint: ``config.json``, ``*.safetensors`` weights
  (``model.safetensors`` or a sharded index), and a tokenizer;
* ``value_head.safetensors`` with ``v_head.weight`` of shape ``[1, hidden]`` and
  optionally ``v_head.bias`` of shape ``[1]`` (Skywork's own names
  ``v_head.summary.weight`` / ``v_head.summary.bias`` are accepted too, so their
  head only has to be copied into this file, not renamed).

A step's score is ``sigmoid(v_head(h))`` where ``h`` is the backbone's final
(normed) hidden state at the last token of the step. The head runs in fp32 even
when the backbone runs in bf16: it is one dot product, and the sigmoid of a
bf16-rounded logit would move scores near the router's threshold.

**Token-classification layout** (as Qwen2.5-Math-PRM): an
``AutoModelForTokenClassification`` checkpoint with 2 labels. Steps are joined
by a step-separator token (default ``"<extra_0>"``) that also closes the last
step, and a step's score is ``softmax(logits at the separator after it)[1]``.
The released Qwen2.5-Math-PRM declares a custom ``*ForProcessRewardModel``
class; it loads only with ``trust_remote_code=True``, which runs Python code
shipped in the folder, so it is never the default.

Text layout: by default the prompt, a newline and the steps are joined as
plain text (the tokenizer adds BOS if it is configured to). With
``use_chat_template=True`` the prompt is rendered as a user turn (after an
optional system prompt) with the tokenizer's chat template, and the steps
follow as the assistant's reply. Weights are read from safetensors only;
pickle files are never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .base import ProcessRewardModel, ScoreItem

VALUE_HEAD_FILE = "value_head.safetensors"
DEFAULT_STEP_SEPARATOR = "<extra_0>"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
_HEAD_KEYS = {"weight": ("v_head.weight", "v_head.summary.weight"),
              "bias": ("v_head.bias", "v_head.summary.bias")}


class HFProcessRewardModel(ProcessRewardModel):
    """Shared text layout, tokenisation and padded batching of the two layouts.

    Each item is scored on its own sequence ending at (or just after) the step,
    so a causal model's score for a step never depends on what follows it and
    `score_batch` agrees with `score` up to float rounding from padding.
    """

    def __init__(self, model, tokenizer, device="cpu", batch_size: int = 8,
                 use_chat_template: bool = False, system_prompt: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the PRM's tokenizer has no chat template")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    # --- what subclasses define -------------------------------------------------
    def _steps_text(self, previous_steps: list[str], step: str) -> str:
        raise NotImplementedError

    def _read_position(self, ids: list[int]) -> int:
        raise NotImplementedError

    def _scores_at(self, input_ids, attention_mask, rows, cols) -> torch.Tensor:
        raise NotImplementedError

    # --- shared machinery -------------------------------------------------------
    def _prompt_text(self, prompt: str) -> str:
        if not self.use_chat_template:
            return prompt + "\n"
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: str, previous_steps: list[str], step: str) -> tuple[list[int], int]:
        """Token ids of one scored sequence and the position whose output is the score."""
        text = self._prompt_text(prompt) + self._steps_text(previous_steps, step)
        # A rendered chat template already carries its own BOS/markers.
        ids = self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]
        return ids, self._read_position(ids)

    def score(self, prompt: str, previous_steps: list[str], step: str) -> float:
        return self.score_batch([(prompt, previous_steps, step)])[0]

    @torch.inference_mode()
    def score_batch(self, items: list[ScoreItem]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(items), self.batch_size):
            encoded = [self.encode(*item) for item in items[start:start + self.batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            # Right padding keeps every real token at its unpadded position.
            input_ids = torch.full((len(encoded), width), self._pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, (ids, _) in enumerate(encoded):
                input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, :len(ids)] = 1
            rows = torch.arange(len(encoded), device=self.device)
            cols = torch.tensor([pos for _, pos in encoded], device=self.device)
            out = self._scores_at(input_ids.to(self.device), attention_mask.to(self.device), rows, cols)
            scores.extend(float(s) for s in out.float().cpu())
        return scores


class ValueHeadPRM(HFProcessRewardModel):
    """Causal-LM backbone + scalar value head read at the step's last token."""

    def __init__(self, backbone, v_head_weight: torch.Tensor, v_head_bias: torch.Tensor | None,
                 tokenizer, device="cpu", **kwargs):
        super().__init__(backbone, tokenizer, device, **kwargs)
        self.v_head_weight = v_head_weight.float().reshape(1, -1).to(self.device)
        bias = torch.zeros(1) if v_head_bias is None else v_head_bias.float().reshape(1)
        self.v_head_bias = bias.to(self.device)

    def _steps_text(self, previous_steps: list[str], step: str) -> str:
        return "".join(previous_steps) + step

    def _read_position(self, ids: list[int]) -> int:
        return len(ids) - 1

    def _scores_at(self, input_ids, attention_mask, rows, cols):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        values = hidden[rows, cols].float() @ self.v_head_weight.T + self.v_head_bias
        return torch.sigmoid(values.squeeze(-1))


class TokenClassificationPRM(HFProcessRewardModel):
    """2-label token classifier read at the separator token that closes the step.

    Trailing whitespace of each step (its "\\n\\n" boundary) is replaced by the
    separator, as Qwen2.5-Math-PRM was trained on steps split at blank lines.
    """

    def __init__(self, model, tokenizer, device="cpu",
                 step_separator: str = DEFAULT_STEP_SEPARATOR, **kwargs):
        super().__init__(model, tokenizer, device, **kwargs)
        sep_id = tokenizer.convert_tokens_to_ids(step_separator)
        encoded = tokenizer(step_separator, add_special_tokens=False)["input_ids"]
        if sep_id is None or sep_id == tokenizer.unk_token_id or encoded != [sep_id]:
            raise ValueError(
                f"step separator {step_separator!r} is not a single token of this PRM's tokenizer "
                f"(it encodes to {encoded}); pass the separator the PRM was trained with"
            )
        self.step_separator = step_separator
        self.separator_id = sep_id

    def _steps_text(self, previous_steps: list[str], step: str) -> str:
        return "".join(s.rstrip() + self.step_separator for s in [*previous_steps, step])

    def _read_position(self, ids: list[int]) -> int:
        for pos in range(len(ids) - 1, -1, -1):
            if ids[pos] == self.separator_id:
                return pos
        raise RuntimeError(f"step separator {self.step_separator!r} vanished during tokenisation")

    def _scores_at(self, input_ids, attention_mask, rows, cols):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[rows, cols].float().softmax(dim=-1)[:, 1]


def detect_prm_kind(path: str | Path) -> str:
    """Return "value_head" or "token_classification" for a PRM folder, else raise ValueError."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"PRM path {str(path)!r} is not a local folder; checkpoints are not downloaded, "
            "pass a folder holding config.json, *.safetensors weights and a tokenizer"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"PRM folder {str(folder)!r} has no config.json")
    weights = [p for p in folder.glob("*.safetensors") if p.name != VALUE_HEAD_FILE]
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {pickled}; pickle files are never loaded, convert them to safetensors)" if pickled else ""
        raise ValueError(f"PRM folder {str(folder)!r} has no *.safetensors model weights{hint}")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"PRM folder {str(folder)!r} has no tokenizer (tokenizer.json/tokenizer_config.json)")
    if (folder / VALUE_HEAD_FILE).is_file():
        return "value_head"
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if any(a.endswith(("ForTokenClassification", "ForProcessRewardModel")) for a in architectures):
        return "token_classification"
    raise ValueError(
        f"cannot tell which PRM layout {str(folder)!r} holds (architectures={architectures}): expected "
        f"either {VALUE_HEAD_FILE} beside a causal-LM checkpoint (value-head layout) or a config whose "
        "architectures name a *ForTokenClassification model with 2 labels"
    )


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {sorted(_DTYPES)}")


def _load_value_head(folder: Path, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    tensors = load_file(str(folder / VALUE_HEAD_FILE))
    found = {part: next((tensors[k] for k in keys if k in tensors), None) for part, keys in _HEAD_KEYS.items()}
    weight, bias = found["weight"], found["bias"]
    if weight is None:
        raise ValueError(f"{folder / VALUE_HEAD_FILE} has no 'v_head.weight' (keys: {sorted(tensors)})")
    if weight.numel() != hidden_size:
        raise ValueError(f"v_head.weight has shape {list(weight.shape)}; expected [1, {hidden_size}]")
    if bias is not None and bias.numel() != 1:
        raise ValueError(f"v_head.bias has shape {list(bias.shape)}; expected [1]")
    return weight, bias


def load_prm(path_or_name: str | Path, device="cpu", dtype="fp32", *, batch_size: int = 8,
             step_separator: str = DEFAULT_STEP_SEPARATOR, use_chat_template: bool = False,
             system_prompt: str | None = None, trust_remote_code: bool = False) -> HFProcessRewardModel:
    """Load a PRM from a local folder, choosing the layout from what the folder holds."""
    from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification, AutoTokenizer

    kind = detect_prm_kind(path_or_name)
    folder = Path(path_or_name)
    torch_dtype = _resolve_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    common = dict(batch_size=batch_size, use_chat_template=use_chat_template, system_prompt=system_prompt)
    load = dict(dtype=torch_dtype, use_safetensors=True)

    if kind == "value_head":
        weight, bias = _load_value_head(folder, config.hidden_size)
        backbone = AutoModel.from_pretrained(folder, **load).to(device)
        return ValueHeadPRM(backbone, weight, bias, tokenizer, device, **common)

    if any(a.endswith("ForProcessRewardModel") for a in config.architectures or []):
        if not trust_remote_code:
            raise ValueError(
                f"{str(folder)!r} declares a custom {config.architectures} class; loading it runs Python "
                "shipped in the folder, so pass trust_remote_code=True if you trust it"
            )
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, **load)
    else:
        if getattr(config, "num_labels", None) != 2:
            raise ValueError(f"token-classification PRM {str(folder)!r} has {config.num_labels} labels; expected 2")
        model = AutoModelForTokenClassification.from_pretrained(folder, **load)
    return TokenClassificationPRM(model.to(device), tokenizer, device, step_separator=step_separator, **common)
