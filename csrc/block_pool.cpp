#include "block_pool.h"

#include <algorithm>
#include <limits>

namespace arbitrage_fast {
namespace {

// No `a + b - 1`: it would overflow for token counts near INT64_MAX.
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

std::string seq_name(int64_t seq_id) { return "sequence " + std::to_string(seq_id); }

}  // namespace

BlockPool::BlockPool(int64_t num_pages, std::vector<int64_t> block_sizes)
    : block_sizes_(std::move(block_sizes)) {
  // Page ids are int32 so block tables go to the device as int32 without conversion.
  if (num_pages <= 0 || num_pages > std::numeric_limits<PageId>::max()) {
    throw std::invalid_argument("num_pages must be in [1, 2^31), got " +
                                std::to_string(num_pages));
  }
  if (block_sizes_.empty()) {
    throw std::invalid_argument("block_sizes must name at least one model");
  }
  for (size_t m = 0; m < block_sizes_.size(); ++m) {
    if (block_sizes_[m] <= 0) {
      throw std::invalid_argument("block_sizes[" + std::to_string(m) +
                                  "] must be > 0, got " + std::to_string(block_sizes_[m]));
    }
  }
  refcount_.assign(num_pages, 0);
  owner_model_.assign(num_pages, -1);
  pages_per_model_.assign(block_sizes_.size(), 0);
  // Stack order: page 0 on top, so a fresh pool hands out pages 0, 1, 2, ...
  free_.reserve(num_pages);
  for (int64_t p = num_pages - 1; p >= 0; --p) free_.push_back(static_cast<PageId>(p));
}

BlockPool::Sequence& BlockPool::lookup(int64_t seq_id) {
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) throw UnknownSequence("unknown " + seq_name(seq_id));
  return it->second;
}

const BlockPool::Sequence& BlockPool::lookup(int64_t seq_id) const {
  auto it = sequences_.find(seq_id);
  if (it == sequences_.end()) throw UnknownSequence("unknown " + seq_name(seq_id));
  return it->second;
}

void BlockPool::check_model(int64_t model) const {
  if (model < 0 || model >= num_models()) {
    throw std::out_of_range("model index " + std::to_string(model) + " out of range [0, " +
                            std::to_string(num_models()) + ")");
  }
}

BlockPool::PageId BlockPool::allocate(int64_t model) {
  PageId page = free_.back();
  free_.pop_back();
  refcount_[page] = 1;
  owner_model_[page] = static_cast<int32_t>(model);
  ++pages_per_model_[model];
  return page;
}

void BlockPool::release(PageId page) {
  if (--refcount_[page] == 0) {
    --pages_per_model_[owner_model_[page]];
    owner_model_[page] = -1;
    free_.push_back(page);
  }
}

void BlockPool::release_tail(Table& table, size_t keep) {
  // Back to front, so the next allocation pops the released pages in their old order.
  while (table.pages.size() > keep) {
    release(table.pages.back());
    table.pages.pop_back();
  }
}

void BlockPool::add_sequence(int64_t seq_id) {
  if (sequences_.count(seq_id)) {
    throw std::invalid_argument(seq_name(seq_id) + " already exists");
  }
  sequences_.emplace(seq_id, Sequence(block_sizes_.size()));
}

bool BlockPool::has_sequence(int64_t seq_id) const { return sequences_.count(seq_id) > 0; }

void BlockPool::free_sequence(int64_t seq_id) {
  Sequence& seq = lookup(seq_id);
  for (Table& table : seq) release_tail(table, 0);
  sequences_.erase(seq_id);
}

std::vector<int64_t> BlockPool::sequence_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(sequences_.size());
  for (const auto& kv : sequences_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int64_t BlockPool::num_tokens(int64_t seq_id, int64_t model) const {
  const Sequence& seq = lookup(seq_id);
  check_model(model);
  return seq[model].num_tokens;
}

const std::vector<BlockPool::PageId>& BlockPool::block_table(int64_t seq_id,
                                                             int64_t model) const {
  const Sequence& seq = lookup(seq_id);
  check_model(model);
  return seq[model].pages;
}

int64_t BlockPool::pages_needed(int64_t seq_id, int64_t model, int64_t new_num_tokens) const {
  const Sequence& seq = lookup(seq_id);
  check_model(model);
  const Table& t = seq[model];
  if (new_num_tokens < t.num_tokens) {
    throw std::invalid_argument("extend cannot shrink " + seq_name(seq_id) + " model " +
                                std::to_string(model) + " from " +
                                std::to_string(t.num_tokens) + " to " +
                                std::to_string(new_num_tokens) + " tokens; use truncate");
  }
  if (new_num_tokens == t.num_tokens) return 0;
  const int64_t bs = block_sizes_[model];
  // The next token lands in the last page when it is partly filled; a shared one must be
  // copied first so the other sequences keep their bytes.
  const bool cow = t.num_tokens % bs != 0 && refcount_[t.pages.back()] > 1;
  const int64_t fresh = ceil_div(new_num_tokens, bs) - static_cast<int64_t>(t.pages.size());
  return fresh + (cow ? 1 : 0);
}

std::vector<BlockPool::CopyPair> BlockPool::extend(int64_t seq_id, int64_t model,
                                                   int64_t new_num_tokens) {
  const int64_t needed = pages_needed(seq_id, model, new_num_tokens);
  if (needed > num_free_pages()) {
    throw KVCacheExhausted("KV cache exhausted: " + seq_name(seq_id) + " model " +
                           std::to_string(model) + " needs " + std::to_string(needed) +
                           " pages to grow to " + std::to_string(new_num_tokens) +
                           " tokens, only " + std::to_string(num_free_pages()) + " of " +
                           std::to_string(num_pages()) + " are free");
  }
  Table& t = lookup(seq_id)[model];
  const int64_t bs = block_sizes_[model];
  std::vector<CopyPair> copies;
  if (new_num_tokens > t.num_tokens && t.num_tokens % bs != 0 &&
      refcount_[t.pages.back()] > 1) {
    const PageId shared = t.pages.back();
    const PageId own = allocate(model);
    release(shared);  // still referenced elsewhere, so it stays off the free list
    t.pages.back() = own;
    copies.emplace_back(shared, own);
  }
  const size_t total = static_cast<size_t>(ceil_div(new_num_tokens, bs));
  while (t.pages.size() < total) t.pages.push_back(allocate(model));
  t.num_tokens = new_num_tokens;
  return copies;
}

void BlockPool::truncate(int64_t seq_id, int64_t model, int64_t num_tokens) {
  Sequence& seq = lookup(seq_id);
  check_model(model);
  Table& t = seq[model];
  if (num_tokens < 0 || num_tokens > t.num_tokens) {
    throw std::invalid_argument("truncate " + seq_name(seq_id) + " model " +
                                std::to_string(model) + " to " + std::to_string(num_tokens) +
                                " tokens: must be in [0, " + std::to_string(t.num_tokens) +
                                "]");
  }
  release_tail(t, static_cast<size_t>(ceil_div(num_tokens, block_sizes_[model])));
  t.num_tokens = num_tokens;
}

void BlockPool::fork(int64_t src_seq, int64_t dst_seq) {
  const Sequence& src = lookup(src_seq);
  if (sequences_.count(dst_seq)) {
    throw std::invalid_argument("cannot fork into " + seq_name(dst_seq) +
                                ": it already exists");
  }
  Sequence copy = src;  // copy before emplace: emplace may rehash and move src
  for (const Table& table : copy) {
    for (PageId page : table.pages) ++refcount_[page];
  }
  sequences_.emplace(dst_seq, std::move(copy));
}

void BlockPool::share_prefix(int64_t src_seq, int64_t dst_seq, int64_t model,
                             int64_t num_tokens) {
  check_model(model);
  if (src_seq == dst_seq) {
    throw std::invalid_argument("cannot share a prefix of " + seq_name(src_seq) + " with itself");
  }
  const Table& src = lookup(src_seq)[model];
  Table& dst = lookup(dst_seq)[model];
  if (num_tokens < 0 || num_tokens > src.num_tokens) {
    throw std::invalid_argument("share " + std::to_string(num_tokens) + " tokens of " +
                                seq_name(src_seq) + " model " + std::to_string(model) +
                                ": must be in [0, " + std::to_string(src.num_tokens) + "]");
  }
  const auto keep = static_cast<size_t>(ceil_div(num_tokens, block_sizes_[model]));
  std::vector<PageId> pages(src.pages.begin(), src.pages.begin() + keep);
  // Take the new references before dropping dst's old ones: a page both tables hold must
  // never pass through refcount 0 (it would land on the free list while still in use).
  for (PageId page : pages) ++refcount_[page];
  release_tail(dst, 0);
  dst.pages = std::move(pages);
  dst.num_tokens = num_tokens;
}

bool BlockPool::can_allocate(int64_t num_pages) const {
  if (num_pages < 0) {
    throw std::invalid_argument("can_allocate needs a page count >= 0, got " +
                                std::to_string(num_pages));
  }
  return num_pages <= num_free_pages();
}

int64_t BlockPool::refcount(int64_t page) const {
  if (page < 0 || page >= num_pages()) {
    throw std::out_of_range("page " + std::to_string(page) + " out of range [0, " +
                            std::to_string(num_pages()) + ")");
  }
  return refcount_[page];
}

PoolStats BlockPool::stats() const {
  return PoolStats{num_pages(),
                   num_free_pages(),
                   num_pages() - num_free_pages(),
                   pages_per_model_,
                   static_cast<int64_t>(sequences_.size()),
                   block_sizes_};
}

}  // namespace arbitrage_fast
