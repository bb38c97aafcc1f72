"""Step-boundary detection: the Triton kernel against the torch reference, the reference
against a per-token loop that reads like the definition."""
import pytest
import torch

from helpers.triton_kernels import DEVICE, load_kernel, needs_triton as _needs_triton

sb = load_kernel("step_boundary")
needs_triton = _needs_triton(sb)


def _naive(tokens, is_boundary, eos_ids, step_len, cap):
    out = []
    for b in range(tokens.shape[0]):
        end = tokens.shape[1]
        for j, tok in enumerate(tokens[b].tolist()):
            hit = 0 <= tok < is_boundary.numel() and bool(is_boundary[tok])
            if hit or tok in eos_ids.tolist() or int(step_len[b]) + j + 1 >= cap:
                end = j
                break
        out.append(end)
    return torch.tensor(out)


def _case(B, K, V, seed, num_eos=2, boundary_frac=0.05, cap=64):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, K), generator=g)
    is_boundary = torch.rand(V, generator=g) < boundary_frac
    eos_ids = torch.randperm(V, generator=g)[:num_eos]
    step_len = torch.randint(0, cap, (B,), generator=g)
    return tokens, is_boundary, eos_ids, step_len, cap


def _on(device, case):
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in case)


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_definition(seed):
    case = _case(B=6, K=13, V=50, seed=seed, boundary_frac=0.04)
    case[0][0, 3] = -1  # padding is never a boundary
    assert torch.equal(sb.first_step_end_reference(*case), _naive(*case))


def test_reference_edge_rows():
    V, K = 20, 7
    is_boundary = torch.zeros(V, dtype=torch.bool)
    is_boundary[5] = True
    tokens = torch.tensor([[1, 2, 3, 4, 6, 7, 8],    # nothing ends the step
                           [1, 5, 3, 4, 6, 7, 8],    # boundary at 1
                           [1, 2, 9, 4, 5, 7, 8],    # EOS at 2 before boundary at 4
                           [1, 2, 3, 4, 6, 7, 8],    # cap reached at j = 2 (7 + 2 + 1 >= 10)
                           [1, 2, 3, 4, 6, 7, 8]])   # already at the cap: ends at once
    step_len = torch.tensor([0, 0, 0, 7, 12])
    out = sb.first_step_end_reference(tokens, is_boundary, torch.tensor([9]), step_len, 10)
    assert out.tolist() == [K, 1, 2, 2, 0]


@needs_triton
@pytest.mark.parametrize("B,K,num_eos,seed", [(5, 13, 2, 0), (3, 32, 0, 1), (4, 1, 1, 2), (2, 70, 3, 3)])
def test_kernel_matches_reference(B, K, num_eos, seed):
    case = _case(B=B, K=K, V=300, seed=seed, num_eos=num_eos, boundary_frac=0.02, cap=200)
    case[0][0] = case[0][0].clamp(max=0) - 1          # a padded row far from its cap goes on
    case[3][0] = 0
    case[3][-1] = 200 - 2                              # the last row hits its cap at j = 1
    want = sb.first_step_end_reference(*case)
    assert want[0] == K and want[-1] <= 1
    got = sb.first_step_end_triton(*_on(DEVICE, case)).cpu()
    assert torch.equal(got, want)


@needs_triton
def test_kernel_on_strided_tokens_and_caps():
    V, K = 64, 9
    is_boundary = torch.zeros(V, dtype=torch.bool)
    is_boundary[[3, 40]] = True
    wide = torch.randint(5, 39, (4, 2 * K), generator=torch.Generator().manual_seed(7))
    tokens = wide[:, ::2]                               # non-contiguous rows and columns
    tokens[1, 4] = 40
    tokens[2, 6] = 63
    step_len = torch.tensor([0, 0, 0, 30])
    case = (tokens, is_boundary, torch.tensor([63]), step_len, 32)
    want = sb.first_step_end_reference(*case)
    assert want.tolist() == [K, 4, 6, 1]
    assert torch.equal(sb.first_step_end_triton(*_on(DEVICE, case)).cpu(), want)
