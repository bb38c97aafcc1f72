"""Continuous batching: which requests run, and one forward per model role per iteration.

Each iteration:
  1. admit waiting requests, oldest first, while the batch has room and the pool has pages
     for the request's whole committed context plus a margin (no skipping ahead: a request
     that does not fit yet holds the queue, so a preempted request is never starved);
  2. the draft forward: every running request whose flow waits on the draft contributes its
     work (one-token decode rows and catch-up prefill chunks mixed, prefill split to the
     iteration's token budget), run as ONE varlen batch;
  3. the target forward, the same way, including work that step 2 just produced;
  4. each request's flow takes its output and runs on to its next model work, committing
     steps (its policy decides on its own step) or ending.
After each model's forward, with decode_chunk != 1, that model's shared chunked loop
(runtime/chunked_rows.py) runs one chunk of k tokens for every greedy step holding a row in it,
with one host read for all of them; the flows whose step ended run on the same way.

Memory: KV room for a forward is reserved before it runs. When the pool is full the newest
running request is preempted (pages freed, committed steps kept, recomputed on resume),
never an older one, so the oldest request always progresses; a request that does not fit
even alone fails with `KVCacheExhausted` naming the sizes. Every way out of the running set
(finish, failure, abort, preemption) frees the request's pages.

Prefix sharing: before a flow catches up in a model it asks to share (`SharePrefix`), and
the scheduler hands it the whole pages of the longest prefix of its context another running
request has computed in that model (prefix_sharing.py), so n samples of one prompt, or one
problem under several policies, prefill the prompt once per model (but for the tail of its
last page, which each request computes). When another request is
computing that prefix right now (its prefill is queued or split over iterations), the asker
waits: its flow stays parked on the question, holds no work in any forward, and asks again
at the start of each iteration until the prefix is computed, or the other request leaves
(preempted, ended, aborted) and it computes the prefix itself. Sharing is decided per model
at the moment of catch-up rather than at admission, because a policy prefills the target
lazily (RSD: after the first draft step), long after both requests drafted. Admission still
counts each request's whole context in pages (a shared prefix is not discounted), and pages
are copy-on-write and reference counted in the pool, so whatever one request does to its KV
(rollback, preemption, end) the other's is untouched. With the prefix cache on, a request that
finishes or is aborted leaves its computed pages to the cache (prefix_cache.py), whose entries
are offered like running requests and evicted, least recently used, before anyone is preempted.
"""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from . import nvtx
from .kv import KVCacheExhausted
from .prefix_cache import PrefixCache
from .prefix_sharing import plan_share
from .request import Request, RequestState
from .request_flow import request_flow
from .roles import Role
from .runtime.batch_graphs import BUCKETS
from .runtime.chunked_rows import ChunkedRows
from .runtime.model_runner import ForwardOutput
from .runtime.work import ModelWork, SharePrefix, StepWork
from .sequence import Step

if TYPE_CHECKING:
    from .engine import Engine


# Step positions a shared chunked loop holds per row (the largest step cap it takes plus one
# chunk): 512 keeps the per-position buffers within a power of two (graphs.py rounds up).
ROWS_CAPACITY = 512


class Scheduler:
    def __init__(self, eng: "Engine", max_batch: int, max_batch_tokens: int, prefix_cache: bool = False) -> None:
        self.eng = eng
        self.prefix_cache = PrefixCache(eng.cache) if prefix_cache else None
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the newest is preempted first
        # Progress of a work item split over iterations (chunked prefill): tokens fed, rows kept.
        self._fed: dict[int, int] = {}
        self._parts: dict[int, list[ForwardOutput]] = {}
        self.last_batch = {Role.DRAFT: 0, Role.TARGET: 0}  # rows of each role's last forward
        self._rows: dict[Role, ChunkedRows] = {}  # each model's shared chunked loop, made on first use

    # ------------------------------------------------------------------ requests in and out
    def add(self, req: Request) -> None:
        self._check_fits_alone(req)
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        if req.state is RequestState.WAITING:
            self.waiting.remove(req)
        elif req.state is RequestState.RUNNING:
            self._retain(req)
            self._leave(req)
        req.state = RequestState.ABORTED
        req.stats.wall_s = time.perf_counter() - req.arrival

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> set[Request]:
        """Run one iteration; returns the requests that committed a step or ended in it."""
        touched: set[Request] = set()
        with nvtx.range("admit"):
            self._resume_sharing(touched)
            self._admit(touched)
        for role in Role:
            self._forward(role, touched)
            self._decode_rows(role, touched)
        return touched

    def _forward(self, role: Role, touched: set[Request]) -> None:
        """The role's one batched forward over its collected work; the flows it served run on."""
        batch = self._reserve(role, self._collect(role), touched)
        self.last_batch[role] = len(batch)
        if not batch:
            return
        t = time.perf_counter()
        with nvtx.range(f"{role.label}.forward[{len(batch)}]"):
            outs = self.eng.runners[role].run([w for _, w, _ in batch], [s for _, _, s in batch])
        dt = time.perf_counter() - t
        done = []
        for (req, work, _), out in zip(batch, outs):
            req.stats.add_seconds(role, dt)
            whole = self._gather(req, work, out)
            if whole is not None:
                req.pending = None  # computed: no longer a prefill others could wait for
                done.append((req, whole))
        for req, whole in done:
            self._advance(req, whole, touched)

    # ------------------------------------------------------------------ shared chunked decoding
    def chunked_rows(self, role: Role) -> ChunkedRows | None:
        """The model's shared chunked loop (runtime/chunked_rows.py), where steps of several
        greedy requests decode k tokens per host read; None when decode_chunk is 1 or the
        batch holds one request at most."""
        chunk = self.eng.config.decode_chunk
        if chunk == 1 or self.max_batch < 2:
            return None
        if role not in self._rows:
            rows = min(self.max_batch, BUCKETS[-1])
            k = chunk or ChunkedRows.ADAPTIVE_CHUNK
            self._rows[role] = ChunkedRows(self.eng.runners[role], rows, ROWS_CAPACITY - k, chunk)
        return self._rows[role]

    def _decode_rows(self, role: Role, touched: set[Request]) -> None:
        """One chunk of the role's shared loop over every request whose step holds a row,
        making KV room as `_reserve` does; the flows of the steps that ended run on."""
        rows = self._rows.get(role)
        if rows is None or not len(rows):
            return
        while True:
            stepping = [r for r in self.running if isinstance(r.pending, StepWork) and r.pending.role == role]
            if not stepping:
                return
            t = time.perf_counter()
            try:
                with nvtx.range(f"{role.label}.chunk[{len(stepping)}]"):
                    ended = rows.run_chunk({r.pending.seq_id: r.pending for r in stepping})
                break
            except KVCacheExhausted:
                if self._evict_one():
                    continue
                victim = self.running[-1]
                if len(self.running) == 1:
                    self._fail(victim, KVCacheExhausted(self._too_large(victim)), touched)
                else:
                    self._preempt(victim)
        dt = time.perf_counter() - t
        for req in stepping:
            req.stats.add_seconds(role, dt)
        for req in stepping:
            if req.pending.seq_id in ended:
                step = ended[req.pending.seq_id]
                req.pending = None
                self._advance(req, step, touched)

    def _admit(self, touched: set[Request]) -> None:
        cache = self.eng.cache
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            need = self._context_pages(req)
            margin = max(1, cache.num_pages // 100) + len(self.running)
            if self.running and cache.stats()["free_pages"] < need + margin:
                if self._evict_one():
                    continue
                break
            self.waiting.popleft()
            cache.add_sequence(req.seq.seq_id)
            req.state = RequestState.RUNNING
            req.stats.queue_s += time.perf_counter() - req.waiting_since
            self.running.append(req)
            req.flow = request_flow(self.eng, req)
            self._advance(req, None, touched)

    def _collect(self, role: Role) -> list[tuple[Request, ModelWork]]:
        """This role's work within the iteration's token budget: every decode row first (a
        token each, so prefills never stall decoding), then prefills oldest first, the last one
        that fits cut to what is left (chunked prefill)."""
        waiting_on = [r for r in self.running if isinstance(r.pending, ModelWork) and r.pending.role == role]
        left = lambda r: len(r.pending.tokens) - self._fed.get(r.request_id, 0)  # noqa: E731
        picked, budget = [], self.max_batch_tokens
        for req in sorted(waiting_on, key=lambda r: left(r) > 1):  # stable: oldest first within each kind
            if budget <= 0:
                break
            work, fed = req.pending, self._fed.get(req.request_id, 0)
            take = min(left(req), budget)
            # A chunk returns the work's wanted rows that fall in it; one holding none returns its
            # last row, which nobody reads.
            wanted = work.rows_in(fed, fed + take)
            rows = "all" if wanted == take else max(wanted, 1)
            picked.append((req, ModelWork(role, work.seq_id, work.tokens[fed:fed + take], rows)))
            budget -= take
        return picked

    def _reserve(self, role: Role, picked, touched) -> list[tuple[Request, ModelWork, int]]:
        """KV room for every picked work, preempting the newest running requests when the pool
        runs out; returns (request, work, start position) for those that got room."""
        runner = self.eng.runners[role]
        ready = []
        for req, work in picked:
            while req.state is RequestState.RUNNING:
                try:
                    ready.append((req, work, runner.reserve(work.seq_id, len(work.tokens))))
                    break
                except KVCacheExhausted:
                    if self._evict_one():
                        continue
                    victim = self.running[-1]
                    if victim is req and len(self.running) == 1:
                        self._fail(req, KVCacheExhausted(self._too_large(req)), touched)
                    else:
                        self._preempt(victim)
                        ready = [r for r in ready if r[0] is not victim]
        return ready

    def _gather(self, req: Request, work: ModelWork, out: ForwardOutput) -> ForwardOutput | None:
        """The flow's whole output once the last chunk of its work ran, else None."""
        pending = req.pending
        start = self._fed.get(req.request_id, 0)
        fed = start + len(work.tokens)
        if fed < len(pending.tokens):
            self._fed[req.request_id] = fed
            if pending.rows_in(start, fed):
                self._parts.setdefault(req.request_id, []).append(out)
            return None
        self._fed.pop(req.request_id, None)
        parts = self._parts.pop(req.request_id, [])
        if not parts:
            return out
        parts.append(out)
        return ForwardOutput(hidden=torch.cat([p.hidden for p in parts]), logits=torch.cat([p.logits for p in parts]))

    def _advance(self, req: Request, value, touched: set[Request]) -> None:
        """Run the request's flow on to its next model work (or a prefix it must wait for),
        collecting committed steps."""
        try:
            with nvtx.range("request_flow"):  # sampling, decisions, commits (and chunked decoding on GPU)
                item = req.flow.send(value)
                while not isinstance(item, (ModelWork, StepWork)):
                    if isinstance(item, Step):
                        touched.add(req)
                    elif not self._share(req, item):
                        break  # parked on the question until the prefix is computed
                    item = next(req.flow)
            req.pending = item
        except StopIteration as done:
            self._finish(req, done.value, touched)
        except KVCacheExhausted as e:  # raised by a decoder that reserves its own room
            if len(self.running) > 1 or self._evict_one():
                self._preempt(req)
            else:
                self._fail(req, KVCacheExhausted(f"{self._too_large(req)} ({e})"), touched)
        except Exception as e:  # noqa: BLE001 - the request fails; the engine and other requests go on
            self._fail(req, e, touched)

    # ------------------------------------------------------------------ prefix sharing
    def _share(self, req: Request, ask: SharePrefix) -> bool:
        """Give the request the longest computed prefix another one holds; False: wait, one is
        being computed."""
        kept = self.prefix_cache.entries() if self.prefix_cache is not None else ()
        plan = plan_share(ask, req, self.running, self.eng.cache, self._fed, kept)
        if plan.wait:
            return False
        if plan.donor is not None:
            if plan.from_cache:
                self.prefix_cache.hit(plan.donor)
            cache = self.eng.cache
            own = cache.num_tokens(ask.seq_id, ask.role)
            cache.share_prefix(plan.donor, ask.seq_id, ask.role, plan.length)
            prompt = req.seq.prompt_len[ask.role]
            req.stats.add_cached(ask.role, plan.length - own, max(0, min(plan.length, prompt) - own))
        return True

    def _resume_sharing(self, touched: set[Request]) -> None:
        """Ask again for every flow parked on a prefix, oldest first (last iteration's forwards
        may have computed it)."""
        for req in [r for r in self.running if isinstance(r.pending, SharePrefix)]:
            if req.state is RequestState.RUNNING and self._share(req, req.pending):
                self._advance(req, None, touched)

    # ------------------------------------------------------------------ the prefix cache
    def _retain(self, req: Request) -> None:
        if self.prefix_cache is not None and self.eng.cache.has_sequence(req.seq.seq_id):
            self.prefix_cache.retain(req.seq, tuple(Role))

    def _evict_one(self) -> bool:
        """Free a kept prefix to make room; False when none is kept."""
        return self.prefix_cache is not None and self.prefix_cache.evict_one()

    # ------------------------------------------------------------------ leaving the batch
    def _leave(self, req: Request) -> None:
        """Out of the running set with every page returned, whatever the reason."""
        if req.flow is not None:
            req.flow.close()
            req.flow = None
        req.pending = None
        self._fed.pop(req.request_id, None)
        self._parts.pop(req.request_id, None)
        for rows in self._rows.values():
            rows.drop(req.seq.seq_id)
        self.running.remove(req)
        if self.eng.cache.has_sequence(req.seq.seq_id):
            self.eng.cache.free_sequence(req.seq.seq_id)

    def _preempt(self, req: Request) -> None:
        self._leave(req)
        req.rewind_step()
        req.state = RequestState.WAITING
        req.stats.preemptions += 1
        req.waiting_since = time.perf_counter()
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: str, touched: set[Request]) -> None:
        self._retain(req)
        self._leave(req)
        req.state = RequestState.FINISHED
        req.stats.wall_s = time.perf_counter() - req.arrival
        req.result = self.eng.result_of(req, reason)
        touched.add(req)

    def _fail(self, req: Request, error: BaseException, touched: set[Request]) -> None:
        self._leave(req)
        req.state = RequestState.FAILED
        req.error = error
        req.stats.wall_s = time.perf_counter() - req.arrival
        touched.add(req)

    # ------------------------------------------------------------------ sizes
    def _context_pages(self, req: Request) -> int:
        """Pages for the request's committed context plus one token, in each model it uses."""
        cache = self.eng.cache
        return sum(-(-(len(req.seq.tokens(m)) + 1) // cache.block_size(m)) for m in req.policy.roles)

    def _check_fits_alone(self, req: Request) -> None:
        need, total = self._context_pages(req), self.eng.cache.num_pages
        if need > total:
            raise KVCacheExhausted(f"the prompt needs {need} KV pages (draft and target together) but the pool "
                                   f"holds {total}: raise kv_pages / kv_memory_bytes or shorten the prompt")

    def _too_large(self, req: Request) -> str:
        seq, cache = req.seq, self.eng.cache
        return (f"request {req.request_id} does not fit in the KV pool even alone: its context is "
                f"{len(seq.tokens(Role.DRAFT))} draft and {len(seq.tokens(Role.TARGET))} target tokens "
                f"(block sizes {cache.block_sizes}) and the pool holds {cache.num_pages} pages; raise kv_pages / "
                f"kv_memory_bytes or lower max_new_tokens")
