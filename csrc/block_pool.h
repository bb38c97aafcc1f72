// Reference-counted page allocator shared by the draft and the target model.
//
// One arena of equal pages serves every model; model m stores block_sizes[m] tokens of all
// its layers' K and V per page. For each sequence the pool keeps one block table per model.
// The pool is host-side bookkeeping only: it never touches tensors. Operations that need
// bytes moved (copy-on-write) return the (src, dst) page pairs for the caller to copy.
//
// Invariants kept after every public call, including calls that throw:
//   * every page is either on the free list (refcount 0) or referenced (refcount > 0);
//   * refcount[p] == number of block-table slots, over all sequences and models, holding p;
//   * free + used == total; no page appears twice on the free list;
//   * table(seq, m).size() == ceil(num_tokens(seq, m) / block_sizes[m]).
// Every mutating call is all-or-nothing: it validates and counts pages before changing state.
// Not thread-safe: one scheduler thread owns the pool.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace arbitrage_fast {

// The free list cannot cover a request. The scheduler catches this to preempt or refuse;
// the pool is unchanged when it is thrown.
class KVCacheExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A sequence id the pool does not know (Python: KeyError).
class UnknownSequence : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

struct PoolStats {
  int64_t total_pages;
  int64_t free_pages;
  int64_t used_pages;
  std::vector<int64_t> pages_per_model;  // distinct pages owned by each model
  int64_t num_sequences;
  std::vector<int64_t> block_sizes;
};

class BlockPool {
 public:
  using PageId = int32_t;
  using CopyPair = std::pair<int64_t, int64_t>;  // (src_page, dst_page)

  BlockPool(int64_t num_pages, std::vector<int64_t> block_sizes);

  void add_sequence(int64_t seq_id);
  bool has_sequence(int64_t seq_id) const;
  void free_sequence(int64_t seq_id);
  std::vector<int64_t> sequence_ids() const;  // ascending

  int64_t num_tokens(int64_t seq_id, int64_t model) const;
  const std::vector<PageId>& block_table(int64_t seq_id, int64_t model) const;

  // Pages an extend to new_num_tokens would take from the free list (copy-on-write included).
  int64_t pages_needed(int64_t seq_id, int64_t model, int64_t new_num_tokens) const;
  std::vector<CopyPair> extend(int64_t seq_id, int64_t model, int64_t new_num_tokens);
  void truncate(int64_t seq_id, int64_t model, int64_t num_tokens);
  void fork(int64_t src_seq, int64_t dst_seq);
  // dst's table for `model` becomes src's first num_tokens positions: the pages are shared
  // (copy-on-write on the next extend of either), dst's own pages for that model released.
  // One model at a time, so a request can take over another's prompt in the target long
  // after both computed their own drafts.
  void share_prefix(int64_t src_seq, int64_t dst_seq, int64_t model, int64_t num_tokens);

  bool can_allocate(int64_t num_pages) const;
  int64_t refcount(int64_t page) const;
  PoolStats stats() const;

  int64_t num_pages() const { return static_cast<int64_t>(refcount_.size()); }
  int64_t num_models() const { return static_cast<int64_t>(block_sizes_.size()); }
  int64_t num_free_pages() const { return static_cast<int64_t>(free_.size()); }
  // Free list, top of the stack last; exposed so tests can check the invariants above.
  const std::vector<PageId>& free_list() const { return free_; }

 private:
  struct Table {
    int64_t num_tokens = 0;
    std::vector<PageId> pages;
  };
  using Sequence = std::vector<Table>;  // one table per model

  Sequence& lookup(int64_t seq_id);
  const Sequence& lookup(int64_t seq_id) const;
  void check_model(int64_t model) const;
  PageId allocate(int64_t model);  // caller has checked the free list is large enough
  void release(PageId page);
  void release_tail(Table& table, size_t keep);

  std::vector<int64_t> block_sizes_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> owner_model_;  // model whose tables hold the page; valid if refcount > 0
  std::vector<PageId> free_;          // LIFO: recently released pages are reused first
  std::vector<int64_t> pages_per_model_;
  std::unordered_map<int64_t, Sequence> sequences_;
};

}  // namespace arbitrage_fast
