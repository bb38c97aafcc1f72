"""The one dispatch rule of the kernel modules: each public op runs its Triton launcher for
CUDA tensors and its torch twin for all others -- CPU tensors never reach the Triton
interpreter through an op, even though this suite sets TRITON_INTERPRET=1.

Each case calls an op twice on CPU tensors: as they are (the twin must run; the launcher is
replaced by one that fails), and with the rule told the tensors are on CUDA (the launcher
must run; it is replaced by a recorder, since a CPU cannot launch it).
"""
from __future__ import annotations

import pytest
import torch

from helpers.triton_kernels import load_kernel


def _step_boundary():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    args = (tokens, torch.zeros(8, dtype=torch.bool), torch.tensor([5]), torch.zeros(2, dtype=torch.long), 10)
    return "step_boundary", "first_step_end", args


def _router_head():
    B, Hd, F = 2, 8, 3
    args = (torch.randn(B, Hd), torch.ones(Hd), 1e-6, torch.randn(F, Hd), torch.randn(F, Hd), torch.zeros(B, Hd),
            torch.zeros(B, dtype=torch.int32), torch.empty(B, Hd), torch.empty(B, F))
    return "router_head", "fused_norm_router", args


def _paged_attention(op):
    def case():
        q = torch.randn(2, 4, 8)
        cache = torch.randn(4, 4, 2, 8)
        tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        lens = torch.tensor([5, 7], dtype=torch.int32)
        if op == "paged_decode_attention":
            return "paged_attention", op, (q, cache, cache.clone(), tables, lens, 0.3)
        return "paged_attention", op, (q, cache, cache.clone(), tables, torch.tensor([0, 1, 2]), lens, 0.3)
    return case


def _quant_matmul():
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, 8), dtype=torch.int32)  # [N, K / 8] int4 words
    scales = torch.rand(3, 2).half()
    return "quant_matmul", "quant_matmul", (torch.randn(2, 64), words, scales, -scales, 4, 32)


CASES = [_step_boundary, _router_head, _paged_attention("paged_decode_attention"),
         _paged_attention("paged_prefill_attention"), _quant_matmul]


def _outputs(fn, args):
    """What fn produced: its result, or for the fused ops, which write in place, every tensor
    argument after the call (run on copies, so two calls start from the same state)."""
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    result = fn(*args)
    return [result] if result is not None else [a for a in args if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c()[1])
def test_cpu_tensors_take_the_torch_twin(case, monkeypatch):
    name, op, args = case()
    module = load_kernel(name)

    def no_launch(*a, **k):
        raise AssertionError(f"{op} launched its Triton kernel for CPU tensors")

    monkeypatch.setattr(module, f"{op}_triton", no_launch)
    for got, want in zip(_outputs(getattr(module, op), args), _outputs(getattr(module, f"{op}_reference"), args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c()[1])
def test_cuda_tensors_take_the_triton_kernel(case, monkeypatch):
    name, op, args = case()
    module = load_kernel(name)
    if not module.HAS_TRITON:
        pytest.skip("triton is not installed: the op can only take the torch twin")
    calls = []
    monkeypatch.setattr(module, "use_triton", lambda *t: True)
    monkeypatch.setattr(module, f"{op}_triton", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(module, f"{op}_reference", lambda *a, **k: pytest.fail(f"{op} took the torch twin"))
    getattr(module, op)(*args)
    assert len(calls) == 1 and calls[0][0] is args[0]


def test_the_rule_is_the_device():
    utils = load_kernel("_utils")
    assert not utils.use_triton(torch.empty(1))
    assert not utils.use_triton(torch.empty(1, device="meta"))
