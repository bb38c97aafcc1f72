"""Validated configuration objects: mistakes are reported where they are made."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .policies import DEFAULT_LOOKAHEAD_K, DEFAULT_REFLECTION_CUES, check_cues, check_lookahead_k
from .stop_strings import check_stop_strings

# Weight quantization at load (models/group_quant.py holds the formats; kept in step by a test).
QUANT_FORMATS = ("int8", "int4", "int3")
QUANT_GROUPS = (32, 64, 128)

# Temperatures below this sample greedily: dividing logits by a denormal temperature overflows
# to inf and the softmax turns to NaN (vLLM draws the same line).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    ignore_eos: bool = False
    # A step also ends here when the model never writes a blank line.
    max_step_tokens: int = 256
    # The answer ends before the first of these strings (stop_strings.py).
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if not isinstance(self.max_step_tokens, int) or self.max_step_tokens <= 0:
            raise ValueError(f"max_step_tokens must be a positive integer, got {self.max_step_tokens!r}")
        self.stop = check_stop_strings(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def for_choice(self, index: int) -> "SamplingParams":
        """The settings of the `index`-th of n samples of one prompt. A seeded request gives its
        i-th sample seed + i (as vLLM does), so the samples differ and each can be drawn again
        alone; an unseeded one draws every sample from the global generator."""
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=self.seed + index)


@dataclass
class EngineConfig:
    draft: str
    target: str
    device: str = "cpu"
    dtype: str = "float32"
    # Shared KV arena: either a page count or a byte budget (pages win when both are set).
    kv_pages: int | None = None
    kv_memory_bytes: int = 512 * 1024 * 1024
    min_block_size: int = 16
    max_model_len: int | None = None  # default: the smaller model's max_position_embeddings
    # None = target-likelihood PRM; "exact" = testbed checker; a PRM folder; or a ProcessRewardModel.
    prm: object = None
    router: str | None = None  # folder or file of a trained router head
    # Further router heads by name, for policies that ask for one ("arbitrage:exact"): rows that
    # compare routers trained from different labels in one engine, on one clock.
    routers: dict[str, str] = field(default_factory=dict)
    # Tokens decoded per host round-trip when writing a step (rolled back past a boundary):
    # 1 = the per-token decoder, N > 1 = chunks of N, 0 = adaptive (<= 2 host reads per step).
    # Chunks serve a request running alone (and a seeded sampled one always); beside others a
    # greedy step is a row of the model's shared chunked loop (runtime/chunked_rows.py) and a
    # sampled one decodes per token in the scheduler's shared forwards.
    decode_chunk: int = 1
    spec_k: int = 0  # token-level speculation inside target steps (0 = off)
    # Continuous batching: requests running at once, and tokens per model forward (decode rows
    # first, then prefill chunks cut to what is left).
    max_batch: int = 32
    max_batch_tokens: int = 1024
    # Keep ended requests' KV pages for later requests that start with the same tokens, evicted
    # least recently used under memory pressure (prefix_cache.py).
    prefix_cache: bool = False
    # GGUF weights: False = kept packed (their blocks on CPU, repacked value for value for the
    # Triton kernel elsewhere); True = dequantised at load.
    dequantize: bool = False
    # Packed weights (a GGUF kept packed, or draft_quant/target_quant) plus a 16-bit copy of them:
    # forwards of at least this many tokens (prefill chunks, wide decode batches) run the copy,
    # narrower ones the packed kernels (models/dense_copy.py). None = packed weights only. Costs
    # the 16-bit model's memory on top.
    dense_rows: int | None = None
    # The norms, activation and attention on the CPU: None = the model's own choice (a float
    # checkpoint keeps transformers' arithmetic, packed or quantized weights run the compiled
    # kernels), False = the compiled kernels for every model (they sum in another order, within
    # ulps, for less time a token), True = transformers' arithmetic for every model.
    exact_arithmetic: bool | None = None
    # Quantize a model's decoder linear layers at load: None (as stored), "int8" (per output
    # channel), "int4" or "int3" (per group of quant_group inputs: 32, 64 or 128). A GGUF file
    # is dequantised first and requantized from its float values.
    draft_quant: str | None = None
    target_quant: str | None = None
    quant_group: int = 64
    # spec_thinking: a kept draft step whose first word is one of these hands the next step to the target.
    reflection_cues: tuple[str, ...] = DEFAULT_REFLECTION_CUES
    # lookahead: draft steps written ahead before the target judges them in one pass.
    lookahead_k: int = DEFAULT_LOOKAHEAD_K
    # A token's output does not depend on the other rows of its forward (other requests, or its
    # own sequence's prefill/verification chunk): greedy bf16 output is the same alone, batched
    # or speculated. Costs per-query attention and, for layers whose kernel is not row-invariant,
    # one-row products (models/batch_invariant.py). Needs decode_chunk=1.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        self.reflection_cues = check_cues(self.reflection_cues)
        self.lookahead_k = check_lookahead_k(self.lookahead_k)
        if not self.draft or not self.target:
            raise ValueError("EngineConfig needs both a draft and a target checkpoint path")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_pages is not None and self.kv_pages <= 0:
            raise ValueError(f"kv_pages must be positive, got {self.kv_pages}")
        if self.kv_memory_bytes <= 0:
            raise ValueError(f"kv_memory_bytes must be positive, got {self.kv_memory_bytes}")
        if self.min_block_size <= 0:
            raise ValueError(f"min_block_size must be positive, got {self.min_block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not isinstance(self.decode_chunk, int) or self.decode_chunk < 0:
            raise ValueError(f"decode_chunk must be an integer >= 0 (0 = adaptive), got {self.decode_chunk!r}")
        if self.spec_k < 0:
            raise ValueError(f"spec_k must be >= 0, got {self.spec_k}")
        for name in ("max_batch", "max_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {self.prefix_cache!r}")
        if self.exact_arithmetic is not None and not isinstance(self.exact_arithmetic, bool):
            raise ValueError(f"exact_arithmetic must be None, True or False, got {self.exact_arithmetic!r}")
        if not isinstance(self.dequantize, bool):
            raise ValueError(f"dequantize must be True or False, got {self.dequantize!r}")
        for name in ("draft_quant", "target_quant"):
            value = getattr(self, name)
            if value is not None and value not in QUANT_FORMATS:
                raise ValueError(f"{name} must be None or one of {list(QUANT_FORMATS)}, got {value!r}")
        if isinstance(self.quant_group, bool) or self.quant_group not in QUANT_GROUPS:
            raise ValueError(f"quant_group must be one of {list(QUANT_GROUPS)}, got {self.quant_group!r}")
        if self.dense_rows is not None and (isinstance(self.dense_rows, bool) or not isinstance(self.dense_rows, int)
                                            or self.dense_rows < 1):
            raise ValueError(f"dense_rows must be None or a positive integer, got {self.dense_rows!r}")
        if self.dense_rows is not None and self.dequantize:
            raise ValueError("dense_rows adds a 16-bit copy to packed weights; dequantize=True keeps no packed "
                             "weights to add it to (use one or the other)")
        if self.dense_rows is not None and self.device != "cpu":
            raise ValueError(f"dense_rows is for the CPU, where packed kernels lose to a 16-bit GEMM from a few "
                             f"rows; on {self.device!r} the Triton kernel runs packed weights at every width")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be True or False, got {self.batch_invariant!r}")
        if self.batch_invariant and self.dense_rows is not None:
            raise ValueError(f"batch_invariant=True cannot use dense_rows={self.dense_rows}: a row would round "
                             "differently in a forward wide enough for the 16-bit copy than in a narrow one")
        if self.batch_invariant and self.decode_chunk != 1:
            raise ValueError(f"batch_invariant=True needs decode_chunk=1 (got {self.decode_chunk}): the chunked "
                             "decoder attends from device-side lengths with a split chosen by the batch")
