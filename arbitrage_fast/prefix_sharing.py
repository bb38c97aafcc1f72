"""Which running request a catch-up prefill can share its KV with, and whether to wait for one.

Requests that share leading tokens (n samples of one prompt, one problem under several
policies, one chat template's system prompt) need the same KV for them in each model. Before
a flow prefills in a model it yields a `SharePrefix` naming the context it is about to catch
up on; this module answers from the running requests:

* what another request has *computed* in that model, checked token by token: its committed
  tokens up to its KV length. KV past the committed context (a step in progress) is never
  offered, since nothing records which ids it holds;
* in whole pages only, as vLLM's prefix cache does: a shared stretch shorter than a page
  (two prompts that merely start with the same BOS token) is not worth a wait, and a whole
  page is never written again by either request, so sharing never costs a page copy;
* what another request is computing right now: the work it waits on in that model (a prefill
  perhaps split over iterations) will leave its KV holding a longer shared prefix. Then the
  asker waits for it rather than computing the same tokens beside it, which is how identical
  prompts admitted in one iteration still prefill once. A wait is only ever for a model work
  that is queued to run, and is re-decided every iteration (the other request may be
  preempted or end meanwhile), so no request waits on a waiting one and no wait lasts forever.

With the prefix cache on (prefix_cache.py), finished requests' kept prefixes are offered too,
like running requests that compute nothing more.

The pages themselves are shared by the pool (`PagedKVCache.share_prefix`): copy-on-write on
the next write of either request, reference counted, so the other request's rollback,
preemption or end never touches what the asker took.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from .kv.paged_cache import PagedKVCache
from .request import Request
from .runtime.work import ModelWork, SharePrefix

if TYPE_CHECKING:
    from .prefix_cache import CachedPrefix


@dataclass(frozen=True)
class SharePlan:
    donor: int | None  # the sequence whose pages to take now (None: nobody holds more than the asker)
    length: int  # how many leading tokens to take from it
    wait: bool  # another request is computing a longer shared prefix: ask again next iteration
    from_cache: bool = False  # the donor is a prefix cache entry


def plan_share(ask: SharePrefix, asker: Request, running: Iterable[Request], cache: PagedKVCache,
               fed: Mapping[int, int], cached: Iterable["CachedPrefix"] = ()) -> SharePlan:
    """The best prefix of `ask.context` to take over now, or a wait. `fed` holds the tokens each
    request's current work has fed so far in earlier iterations (chunked prefill); `cached` are
    the prefix cache's entries."""
    own = cache.num_tokens(ask.seq_id, ask.role)
    page = cache.block_size(ask.role)
    whole = lambda n: n - n % page  # noqa: E731
    best_now, donor, best_soon, from_cache = own, None, own, False
    for entry in cached:  # whole pages already, all computed
        shared = whole(common_prefix_len(ask.context, entry.tokens.get(ask.role, [])))
        if shared > best_now:
            best_now, donor, from_cache = shared, entry.seq_id, True
    for other in running:
        if other is asker:
            continue
        shared = whole(common_prefix_len(ask.context, other.seq.tokens(ask.role)))
        if shared <= own:
            continue
        kv = cache.num_tokens(other.seq.seq_id, ask.role)
        if whole(min(shared, kv)) > best_now:
            best_now, donor, from_cache = whole(min(shared, kv)), other.seq.seq_id, False
        work = other.pending
        if isinstance(work, ModelWork) and work.role == ask.role:
            start = kv - fed.get(other.request_id, 0)  # where its work's first token lands
            best_soon = max(best_soon, whole(min(shared, start + len(work.tokens))))
    if best_soon > best_now:
        return SharePlan(None, 0, wait=True)
    return SharePlan(donor, best_now, wait=False, from_cache=from_cache)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, comparing slices (C speed) by bisection."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
