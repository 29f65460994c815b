"""Scheduler with a real KVCacheManager and no model: which requests run, how many tokens each computes,
preemption when blocks run out, and that every block comes back once requests finish or are aborted.

`update` below stands in for the engine after a step: no model, so a step that reaches the end of the
known tokens emits 1 + accepted made-up tokens, and `Scheduler.commit` does the rest (the counter moves by
scheduled - rejected). The speculation length is a fixed or scripted k (`ScriptedK`), always the draft's.
"""

from __future__ import annotations

import random

import pytest
from kv_accounting import assert_nothing_held, assert_pool_consistent, make_request

from specserve.config import SchedulerConfig
from specserve.engine.block_pool import hash_block
from specserve.engine.kv_cache_manager import KVCacheManager
from specserve.engine.proposal import SpecChoice, SpecSource
from specserve.engine.request import Request, RequestStatus
from specserve.engine.scheduler import Scheduler, SchedulerOutput

BS = 4


class ScriptedK:
    """A speculation length that proposes `k(request, batch)` draft tokens (an int k: always k); no statistics."""

    def __init__(self, k) -> None:
        self.k = k if callable(k) else (lambda request, batch: k)

    def __call__(self, request: Request, batch: int) -> SpecChoice | None:
        k = self.k(request, batch)
        return SpecChoice(SpecSource.DRAFT, k) if k > 0 else None

    def observe(self, request: Request, choice: SpecChoice | None, num_accepted: int) -> None:
        """Nothing to learn."""

    def forget(self, request_id: str) -> None:
        """Nothing kept."""


def make_scheduler(
    num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, max_model_len: int | None = None, k=None
) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    return Scheduler(config, kv, max_model_len or num_blocks * BS, None if k is None else ScriptedK(k))


def update(scheduler: Scheduler, plan: SchedulerOutput, accept=lambda request, k: k) -> list[Request]:
    """The engine's post-step work, with `accept(request, k)` draft tokens accepted; returns the finished."""
    finished = []
    for s in plan.scheduled:
        r = s.request
        if not s.samples:  # a prompt chunk short of the end
            scheduler.commit(s, None, recompute_accepted=False)
            continue
        accepted = accept(r, s.num_draft_tokens)
        emitted = [1000 + r.num_tokens + i for i in range(accepted + 1)]  # accepted drafts, then recovered/bonus
        scheduler.commit(s, emitted, recompute_accepted=False)
        if r.is_finished:
            finished.append(r)
    return finished


def step(scheduler: Scheduler, accept=lambda request, k: k) -> tuple[SchedulerOutput, list[Request]]:
    plan = scheduler.schedule()
    return plan, update(scheduler, plan, accept)


def assert_accounting(scheduler: Scheduler) -> None:
    """What holds between steps: the running hold their computed tokens' blocks, the waiting hold nothing,
    every reference is a request's, and a cached block a request holds carries that request's tokens."""
    kv = scheduler.kv
    assert_pool_consistent(kv.pool)
    for r in scheduler.running:
        blocks = kv.blocks_of(r.request_id)
        assert r.status is RequestStatus.RUNNING
        assert len(blocks) * BS >= r.num_computed_tokens
        parent = None
        for i, block_id in enumerate(blocks[: r.num_computed_tokens // BS]):
            h = hash_block(parent, r.all_token_ids[i * BS : (i + 1) * BS])
            assert kv.pool.blocks[block_id].block_hash in (None, h)
            parent = h
    for r in scheduler.waiting:
        assert kv.blocks_of(r.request_id) == [] and r.num_computed_tokens == 0
    refs = {}
    for blocks in kv.req_blocks.values():
        for b in blocks:
            refs[b] = refs.get(b, 0) + 1
    assert all(kv.pool.blocks[b].ref_count == refs.get(b, 0) for b in range(kv.pool.num_blocks))
    assert set(kv.req_blocks) <= {r.request_id for r in scheduler.running}


# ---- what one step schedules ---------------------------------------------------------------------------------------


def scheduled(plan: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(request id, tokens, draft tokens, samples) of each scheduled request; read before `update`, as
    `samples` is computed from the request's counters, which the update moves."""
    return [(x.request.request_id, x.num_new_tokens, x.num_draft_tokens, x.samples) for x in plan.scheduled]


def test_prefill_then_decode_with_draft_slots():
    s = make_scheduler(k=3)
    r = make_request("r", list(range(10)), max_tokens=20)
    s.add(r)
    plan = s.schedule()
    assert scheduled(plan) == [("r", 10, 0, True)]  # no drafting in a prefill
    update(s, plan)
    assert r.num_computed_tokens == 10 and r.num_tokens == 11 and r.status is RequestStatus.RUNNING
    plan = s.schedule()
    assert scheduled(plan) == [("r", 4, 3, True)]  # the new token + k drafts
    update(s, plan)
    assert r.num_computed_tokens == 14 and r.num_tokens == 15  # all 3 accepted, plus a bonus token
    assert len(s.kv.blocks_of("r")) == 4  # the 10 + 4 slots of the two steps
    assert_accounting(s)


def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    s = make_scheduler(budget=8, k=3)
    r = make_request("r", list(range(20)))
    s.add(r)
    chunks = []
    while r.num_output_tokens == 0:
        plan = s.schedule()
        chunks += scheduled(plan)
        update(s, plan)
    assert chunks == [("r", 8, 0, False), ("r", 8, 0, False), ("r", 4, 0, True)]
    assert plan.num_batched_tokens == 4
    assert_accounting(s)


def test_draft_slots_are_capped_by_output_room_context_and_budget():
    s = make_scheduler(k=5)
    r = make_request("r", [1, 2, 3], max_tokens=3)
    s.add(r)
    step(s)  # prefill: 1 output token, room for 2 more: 1 draft + its bonus
    plan, _ = step(s)
    assert plan.scheduled[0].num_draft_tokens == 1
    assert r.is_finished and s.kv.num_free_blocks == s.kv.pool.num_blocks

    s = make_scheduler(k=5, max_model_len=8)
    r = make_request("r", [1, 2, 3, 4, 5], max_tokens=100)
    s.add(r)
    step(s)  # 6 tokens known, 2 more fit the context
    plan, _ = step(s)
    assert plan.scheduled[0].num_draft_tokens == 2

    s = make_scheduler(k=5, budget=10)
    a, b = make_request("a", [1] * 6), make_request("b", [2] * 3)
    s.add(a)
    s.add(b)
    step(s)  # both prefilled: 6 + 3 tokens
    plan, _ = step(s)  # a takes 1 + 5, b gets what is left: 1 + 3
    assert [(x.num_new_tokens, x.num_draft_tokens) for x in plan.scheduled] == [(6, 5), (4, 3)]
    assert plan.num_batched_tokens == 10


def test_the_speculation_length_sees_the_request_and_the_running_batch():
    seen = []
    s = make_scheduler(k=lambda request, batch: seen.append((request.request_id, batch)) or 1)
    for rid in "ab":
        s.add(make_request(rid, [1, 2, 3]))
    step(s)
    assert seen == []  # prefill: no one is asked
    step(s)
    assert seen == [("a", 2), ("b", 2)]


def test_admission_is_first_come_and_bounded_by_max_num_seqs():
    s = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", [i] * 3, max_tokens=2) for i in range(3)]
    for r in reqs:
        s.add(r)
    plan, _ = step(s)
    assert [x.request.request_id for x in plan.scheduled] == ["r0", "r1"]
    assert list(s.waiting) == [reqs[2]]
    step(s)  # r0 and r1 finish
    assert [r.status for r in reqs[:2]] == [RequestStatus.FINISHED_LENGTH] * 2
    plan, _ = step(s)
    assert [x.request.request_id for x in plan.scheduled] == ["r2"]


def test_admission_starts_after_a_prefix_hit():
    s = make_scheduler()
    prompt = list(range(11))
    first = make_request("first", prompt, max_tokens=2)
    s.add(first)
    step(s)
    step(s)
    assert first.is_finished
    again = make_request("again", prompt + [7])
    s.add(again)
    plan = s.schedule()
    assert again.num_computed_tokens == 8  # 2 cached blocks
    assert plan.scheduled[0].num_new_tokens == 4
    assert s.kv.prefix_hit_blocks == 2


# ---- preemption ----------------------------------------------------------------------------------------------------


def test_the_latest_admitted_request_is_preempted_when_blocks_run_out_and_recomputed_later():
    s = make_scheduler(num_blocks=6, k=3)
    a, b = make_request("a", [1] * 7, max_tokens=12), make_request("b", [2] * 7, max_tokens=12)
    s.add(a)
    s.add(b)
    step(s)  # 2 blocks each
    assert s.kv.num_free_blocks == 2
    plan, _ = step(s)  # each wants 8 + 3 slots: a third block each
    assert plan.preempted == [] and s.kv.num_free_blocks == 0
    plan = s.schedule()  # a wants a 4th block: b, admitted last, gives its blocks up
    assert plan.preempted == [b] and [x.request for x in plan.scheduled] == [a]
    assert b.status is RequestStatus.WAITING and list(s.waiting) == [b]
    assert (b.num_computed_tokens, b.num_draft_computed_tokens, b.num_preemptions) == (0, 0, 1)
    assert s.num_preemptions == 1 and s.kv.blocks_of("b") == []
    assert b.output_token_ids  # its tokens are kept: it recomputes their KV, it does not sample again
    update(s, plan)
    assert_accounting(s)
    finished = []
    for _ in range(20):
        finished += step(s)[1]
        assert_accounting(s)
    assert finished == [a, b] and b.num_output_tokens == 12
    assert_nothing_held(s.kv)


def test_the_request_asking_for_a_block_can_be_the_one_preempted():
    s = make_scheduler(num_blocks=3, max_model_len=12)
    a, b = make_request("a", [1] * 7, max_tokens=3), make_request("b", [2] * 4, max_tokens=3)
    s.add(a)
    s.add(b)
    step(s)  # a: 2 blocks, b: 1; none free
    plan = s.schedule()  # a's next token fits its blocks; b's 5th token needs a block, and b is the latest
    assert plan.preempted == [b] and [x.request for x in plan.scheduled] == [a]
    assert list(s.waiting) == [b] and s.kv.blocks_of("b") == []
    update(s, plan)
    finished = []
    for _ in range(10):
        finished += step(s)[1]
        assert_accounting(s)
    assert finished == [a, b]
    assert_nothing_held(s.kv)


def test_nobody_is_admitted_in_a_step_that_preempted():
    s = make_scheduler(num_blocks=6, k=3)
    a, b = make_request("a", [1] * 7, max_tokens=12), make_request("b", [2] * 7, max_tokens=12)
    s.add(a)
    s.add(b)
    step(s)
    step(s)
    late = make_request("late", [3])
    s.add(late)
    plan = s.schedule()
    assert plan.preempted == [b] and list(s.waiting) == [b, late]  # the preempted goes first, then the queue


# ---- finishing and aborting: no block leaks ------------------------------------------------------------------------


def test_abort_frees_a_waiting_or_running_request():
    s = make_scheduler(max_num_seqs=1)
    running, waiting = make_request("running", [1] * 9), make_request("waiting", [2] * 9)
    s.add(running)
    s.add(waiting)
    step(s)
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks - 3
    s.finish(waiting, RequestStatus.FINISHED_ABORTED)
    s.finish(running, RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished() and running.finish_reason == waiting.finish_reason == "abort"
    assert_nothing_held(s.kv)
    assert s.schedule().empty


@pytest.mark.parametrize("seed", range(6))
def test_no_block_leaks_under_random_traffic_preemption_rejection_and_aborts(seed):
    """Random prompts sharing prefixes, random acceptance, random aborts, a pool too small for everyone:
    the accounting holds after every step and every block is free at the end."""
    rng = random.Random(seed)
    s = make_scheduler(num_blocks=rng.choice([12, 16, 20]), max_num_seqs=rng.choice([2, 4, 8]),
                       budget=rng.choice([8, 16, 64]), k=lambda request, batch: rng.randint(0, 5))  # fmt: skip
    shared = [rng.randrange(50) for _ in range(12)]
    prompts = [shared[: rng.randint(0, 12)] + [rng.randrange(50) for _ in range(rng.randint(1, 14))] for _ in range(30)]
    pending = [make_request(f"r{i}", p, max_tokens=rng.randint(1, 24)) for i, p in enumerate(prompts)]
    live: list[Request] = []
    aborted = finished = 0
    for _ in range(2000):
        if pending and rng.random() < 0.5:
            live.append(pending.pop())
            s.add(live[-1])
        if live and rng.random() < 0.05:
            victim = live.pop(rng.randrange(len(live)))
            s.finish(victim, RequestStatus.FINISHED_ABORTED)
            aborted += 1
        plan, done = step(s, accept=lambda request, k: rng.randint(0, k))
        assert plan.num_batched_tokens <= s.config.max_num_batched_tokens
        assert len(s.running) <= s.config.max_num_seqs
        for r in done:
            live.remove(r)
        finished += len(done)
        assert_accounting(s)
        if not pending and not s.has_unfinished():
            break
    assert not live and aborted + finished == 30
    assert s.num_preemptions > 0 and aborted > 0 and s.kv.prefix_hit_blocks > 0  # each path was taken
    assert_nothing_held(s.kv)
