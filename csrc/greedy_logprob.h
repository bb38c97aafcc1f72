// The greedy token of each row of fp32 logits, its log-probability (temperature 1) and, when
// asked, the row's entropy, in two passes over the row: what `logits.argmax(-1)` and
// `token_statistics` give, which every greedy decode row computes over a vocabulary of ~150k
// entries. torch runs those as six passes (argmax; log-sum-exp's max, subtract, exp, sum), four
// more for the entropy (softmax, product, sum), several percent of a batched CPU decode
// iteration; here one pass finds the max (the first index holding it, as torch.argmax) and one
// sums exp(x - max), and x * exp(x - max) for the entropy, eight lanes at a time where the CPU
// has AVX2, the sums in fp64.
//
//   greedy_logprob(logits[B, V] fp32, entropy) -> (tokens[B] int64, logprobs[B] fp32,
//                                                  entropies[B] fp32, or [0] without entropy)
//
// The sums' order differs from torch's, so a log-prob or entropy may differ from torch's in its
// last bits; the token is torch's exactly. A row holding a NaN, an infinity or no finite
// maximum takes torch's ops (whose entropy of a row with -inf entries is NaN, as here).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace arbitrage_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_logprob_cpu(const at::Tensor& logits, bool entropy);
std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_logprob_meta(const at::Tensor& logits, bool entropy);

}  // namespace arbitrage_fast
