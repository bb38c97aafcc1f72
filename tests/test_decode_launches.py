"""How many device launches one decode token costs per decoder layer on the fused (CUDA) path.

Goal (issue: fewer, fatter kernels): at most 10 per layer, against ~35 for the unfused torch
layer. A CPU cannot launch CUDA kernels, so this test counts the launches the CUDA path
*would* make, honestly approximated:

- Every kernel module's dispatch rule is told the tensors are on CUDA (the path CUDA takes),
  and each Triton launcher is replaced by a stub that counts its launches and computes the
  result with the torch twin while the aten counter is paused. The paged decode attention
  counts 2 (kernel + split merge), as if the context were always split.
- Everything else is counted as dispatched aten operations (TorchDispatchMode), one launch
  each, except views and allocations, which launch nothing. A GEMM counts 1 (cuBLAS may use a
  second kernel for split-K; that is not counted). A dispatched op is not always exactly one
  CUDA kernel, so this is a model of the launch count, not a profile; `nsys` on the GPU
  (benchmarks/profile.sh) is the ground truth.
- Per layer = count(2-layer model) - count(1-layer model): the embedding, the rotary tables,
  the final norm and the LM head run once per token and cancel.

The same counter also checks that a layer, and a whole decode iteration, make no host sync:
no `_local_scalar_dense`, the op behind `.item()` and `bool(tensor)`, which would break
CUDA-graph capture. (`.tolist()` of a CPU tensor dispatches nothing and goes unseen here.)
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from arbitrage_fast.models.architecture import DecoderSpec
from arbitrage_fast.models.llama import LlamaDecoder
from arbitrage_fast.runtime.attention_metadata import AttentionMetadata
from helpers.triton_kernels import load_kernel

transformers = pytest.importorskip("transformers")

# (module, launcher, launches per call)
LAUNCHERS = [("rms_norm", "add_rms_norm_triton", 1), ("activation", "silu_and_mul_triton", 1),
             ("rotary_kv", "rope_write_kv_triton", 1), ("paged_attention", "paged_decode_attention_triton", 2),
             ("paged_attention", "paged_prefill_attention_triton", 1)]
GOAL_PER_LAYER = 10


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched aten ops that launch work (not views, not allocations), and the stubs' launches."""

    def __init__(self) -> None:
        super().__init__()
        self.aten: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if not self.paused and not func.is_view and not name.startswith("empty"):
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


def _fused_path(monkeypatch, counter: LaunchCounter) -> None:
    """Make every kernel op take its Triton launcher, stubbed to count and run the twin."""
    for module_name, launcher, launches in LAUNCHERS:
        module = load_kernel(module_name)
        monkeypatch.setattr(module, "use_triton", lambda *t: True)
        twin = getattr(module, launcher.replace("_triton", "_reference"))

        def stub(*args, _twin=twin, _name=launcher, _n=launches, **kwargs):
            counter.triton[_name] += _n
            counter.paused = True
            try:
                return _twin(*args)
            finally:
                counter.paused = False

        monkeypatch.setattr(module, launcher, stub)


def _decode_token_launches(layers: int, counter: LaunchCounter) -> LaunchCounter:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    spec = DecoderSpec.from_hf_config(cfg)
    torch.manual_seed(0)
    model = LlamaDecoder(spec).eval()
    bs, pages = 4, 4
    kv = torch.zeros(pages, layers, 2, bs, spec.num_kv_heads, spec.head_dim)
    meta = AttentionMetadata.for_device_decode(  # the CUDA graph's form: one token, lengths on the device
        positions=torch.tensor([5]), slot_mapping=torch.tensor([9]),
        block_tables=torch.tensor([[3, 2, 0, 1]], dtype=torch.int32),
        seq_lens_tensor=torch.tensor([6], dtype=torch.int32), block_size=bs)
    ids = torch.tensor([7])
    with torch.inference_mode(), counter:
        model(ids, meta, kv)
    return counter


def test_fused_decode_layer_fits_the_launch_goal(monkeypatch):
    one, two = LaunchCounter(), LaunchCounter()
    _fused_path(monkeypatch, one)
    _decode_token_launches(1, one)
    monkeypatch.undo()
    _fused_path(monkeypatch, two)
    _decode_token_launches(2, two)
    per_layer = two.total - one.total
    layer_ops = (two.aten - one.aten) + (two.triton - one.triton)
    assert per_layer <= GOAL_PER_LAYER, f"{per_layer} launches per layer: {dict(layer_ops)}"
    # What the layer is made of: three GEMMs' worth of mm plus o_proj, and the fused kernels.
    assert two.triton["rope_write_kv_triton"] - one.triton["rope_write_kv_triton"] == 1
    assert two.triton["add_rms_norm_triton"] - one.triton["add_rms_norm_triton"] == 2
    assert "_local_scalar_dense" not in two.aten  # no host sync: capturable


def test_the_counter_sees_the_unfused_layer():
    """Without the fused path (the torch twins on the CPU) the same layer dispatches far more:
    the counter is not blind, and the fusions are what bring the count down."""
    one, two = _decode_token_launches(1, LaunchCounter()), _decode_token_launches(2, LaunchCounter())
    assert two.total - one.total > 2 * GOAL_PER_LAYER


def test_a_decode_iteration_makes_no_host_sync_on_the_cuda_path(monkeypatch):
    """The unit a CUDA graph captures (runtime/decode_iteration.py: metadata from device
    counters, forward, fused final norm + router, LM head, sampling, statistics, bookkeeping)
    reads nothing back to the host: no `_local_scalar_dense` among its dispatched ops."""
    from types import SimpleNamespace

    from arbitrage_fast.config import SamplingParams
    from arbitrage_fast.router.head import RouterConfig, RouterHead
    from arbitrage_fast.runtime.chunked_decoder import folded_router
    from arbitrage_fast.runtime.decode_iteration import DecodeBuffers, DecodeIteration

    counter = LaunchCounter()
    _fused_path(monkeypatch, counter)
    router_kernel = load_kernel("router_head")
    monkeypatch.setattr(router_kernel, "use_triton", lambda *t: True)
    monkeypatch.setattr(router_kernel, "fused_norm_router_triton", router_kernel.fused_norm_router_reference)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    model = LlamaDecoder(DecoderSpec.from_hf_config(cfg)).eval()
    runner = SimpleNamespace(model=model, kv_view=torch.zeros(4, 1, 2, 4, 2, 8), block_size=4)
    with torch.inference_mode():
        buffers = DecodeBuffers(1, 8, 32, 4, torch.device("cpu"))
        buffers.set_block_table(0, [1, 0, 2, 3])
        buffers.start_row(0, 3)
        router = folded_router(RouterHead(RouterConfig(hidden_size=32, width=8)), torch.device("cpu"))
        iteration = DecodeIteration(runner, buffers, SamplingParams(), None, track_features=True,
                                    static_tables=True, router=router)
        with counter:
            iteration()
    assert counter.total > 0 and "_local_scalar_dense" not in counter.aten, dict(counter.aten)


def test_a_padded_decode_batch_makes_no_host_sync_on_the_cuda_path(monkeypatch):
    """The scheduler's decode batch as a bucket's graph captures it (runtime/batch_graphs.py:
    metadata from the static inputs, forward, LM head), padded rows included, reads nothing
    back to the host."""
    from types import SimpleNamespace

    from arbitrage_fast.runtime.batch_graphs import DecodeBuckets

    counter = LaunchCounter()
    _fused_path(monkeypatch, counter)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    model = LlamaDecoder(DecoderSpec.from_hf_config(cfg)).eval()
    runner = SimpleNamespace(model=model, kv_view=torch.zeros(4, 1, 2, 4, 2, 8), block_size=4, max_len=16,
                             cache=SimpleNamespace(num_pages=4), device=torch.device("cpu"))
    with torch.inference_mode():
        buckets = DecodeBuckets(runner, padded=True)
        buckets.static_inputs().fill(4, [7, 9, 11], [3, 5, 0], torch.tensor([[1, 0], [2, 3], [0, 0]],
                                                                              dtype=torch.int32))
        with counter:
            hidden, logits = buckets.forward(4)
    assert hidden.shape == (4, 32) and logits.shape == (4, 64)
    assert counter.total > 0 and "_local_scalar_dense" not in counter.aten, dict(counter.aten)
