// The greedy token of each row of fp32 logits and its log-probability (temperature 1), in two
// passes over the row: what `logits.argmax(-1)` and `token_statistics(..., entropy=False)` give,
// which every greedy decode row computes over a vocabulary of ~150k entries. torch runs those as
// five or six passes (argmax, then logsumexp's max, subtract, exp, sum), a few percent of a
// batched CPU decode iteration; here one pass finds the max (the first index holding it, as
// torch.argmax) and one sums exp(x - max), eight lanes at a time where the CPU has AVX2.
//
//   greedy_logprob(logits[B, V] fp32) -> (tokens[B] int64, logprobs[B] fp32)
//
// The sum's order differs from torch's, so a log-prob may differ from torch's in its last bits;
// the token is torch's exactly. A row holding a NaN or no finite maximum takes torch's ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace arbitrage_fast {

std::tuple<at::Tensor, at::Tensor> greedy_logprob_cpu(const at::Tensor& logits);
std::tuple<at::Tensor, at::Tensor> greedy_logprob_meta(const at::Tensor& logits);

}  // namespace arbitrage_fast
