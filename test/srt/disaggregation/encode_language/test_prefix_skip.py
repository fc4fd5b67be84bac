"""Prefix-aware skip, in process (issue 17 item 2): the language adapter matches an announced
request against a real radix cache, answers the items it holds in its reservation, keeps them
locked until the request is over, and the encoder (a real peer process, real Mooncake writes)
leaves their rows out. Served end to end with HF equality: test_serving_prefix_skip.py."""

from __future__ import annotations

import time
import types
from array import array

import pytest
import torch
import torch.distributed as dist
from conftest import H, new_room, wait_final
from el_helpers import wait_until

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.item_table import ItemEntry
from sglang.srt.disaggregation.encode_language.payload import MultimodalPayload
from sglang.srt.disaggregation.encode_language.prefix_holds import (
    PrefixHolds,
    padded_ids,
)
from sglang.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InsertParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

IMAGE = 7
K = 3
# Two images: item 0 on tokens 2..9, item 1 on tokens 12..19, of 24 tokens.
ITEMS = [
    ItemEntry("image", ((2, 9),), 0x1111),
    ItemEntry("image", ((12, 19),), 0x2222),
]
IDS = [1, 2] + [IMAGE] * 8 + [3, 4] + [IMAGE] * 8 + [5, 6, 7, 8]
M = 16


@pytest.fixture(scope="module")
def group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        yield dist.group.WORLD
        dist.destroy_process_group()
    else:
        yield dist.group.WORLD


def _tree(cached_tokens: int, pool_tokens: int = 4096) -> RadixCache:
    """A radix cache over a KV pool of ``pool_tokens`` holding the first ``cached_tokens``
    ids of the request, as keyed."""
    tree = RadixCache.create_simulated(
        mock_allocator=types.SimpleNamespace(
            device="cpu",
            size=pool_tokens,
            free=lambda *_: None,
            free_segment=lambda *_, **__: None,
        )
    )
    if cached_tokens:
        ids = padded_ids(IDS, ITEMS)[:cached_tokens]
        tree.insert(
            InsertParams(
                key=RadixKey(array("q", ids)), value=torch.arange(cached_tokens)
            )
        )
    return tree


def _adapter(manager, tree, group):
    """The language scheduler's adapter over ``manager`` and a prefix cache, with its real
    ``_attach`` (a stand-in scheduler and HF config)."""
    from sglang.srt.disaggregation.encode_language.connection import PeerLookups
    from sglang.srt.disaggregation.encode_language.language_mm_receiver import (
        LanguageMMReceiver,
    )
    from sglang.srt.disaggregation.encode_language.metrics import EncodeLanguageMetrics

    rx = object.__new__(LanguageMMReceiver)
    rx.peer_lookups = PeerLookups()
    rx.scheduler = types.SimpleNamespace(
        attn_tp_cpu_group=group,
        device="cpu",
        max_req_input_len=4096,
        grammar_manager=types.SimpleNamespace(grammar_queue=[]),
    )
    rx.hf_config = types.SimpleNamespace(image_token_id=IMAGE, video_token_id=8)
    rx.placeholder_ids = {IMAGE, 8}
    rx.rank, rx.num_ranks, rx.is_owner = 0, 1, True
    rx.manager = manager
    rx.holds = PrefixHolds(tree)
    rx.waiting_list = []
    rx.metrics = EncodeLanguageMetrics("language", enabled=False)
    rx._check_context_length = lambda recv_req: None
    rx._req_for_error = lambda recv_req: recv_req.rid
    return rx


def _request(rid: str, encoder: str, room: int) -> TokenizedGenerateReqInput:
    host, port = encoder.rsplit(":", 1)
    return TokenizedGenerateReqInput(
        rid=rid,
        input_text="",
        input_ids=[1, 2, IMAGE, 3, 4, IMAGE, 5, 6, 7, 8],
        input_embeds=None,
        mm_inputs=None,
        token_type_ids=None,
        sampling_params=SamplingParams(max_new_tokens=4),
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        token_ids_logprob=None,
        stream=False,
        bootstrap_host=host,
        bootstrap_port=int(port),
        bootstrap_room=room,
    )


def _payload(held) -> MultimodalPayload:
    """The encoder's payload leaving out the rows of the ``held`` items."""
    g = torch.Generator().manual_seed(5)
    mask = torch.zeros(len(IDS), dtype=torch.bool)
    for i, e in enumerate(ITEMS):
        if i not in held:
            for s, t in e.offsets:
                mask[s : t + 1] = True
    n = int(mask.sum())
    return MultimodalPayload(
        fill_ids=torch.tensor(IDS, dtype=torch.int32),
        mrope_positions=torch.arange(3 * len(IDS), dtype=torch.int32).view(3, -1),
        mm_mask=mask,
        embeddings=torch.randn(n, H, generator=g).to(torch.bfloat16),
        deepstack=torch.randn(n, K * H, generator=g).to(torch.bfloat16),
        mrope_delta=-3,
        items=[e.to_wire() for e in ITEMS],
    )


def _until_reserved(rx, w, timeout=20.0):
    """Adapter iterations until the request's round-0 reservation went out."""
    assert wait_until(
        lambda: rx.process_waiting_requests([]) is not None
        and w.receiver.poll() == KVPoll.WaitingForInput,
        timeout,
    ), f"phase {w.receiver.phase}"


def _send_round(peer, rx, room, payload, req) -> None:
    """The encoder sends ``payload`` in one round; the adapter hands over exactly ``req``."""
    peer.call("send_payload", room, payload)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    ready = []
    assert wait_until(
        lambda: ready.extend(rx.process_waiting_requests([])[0]) or ready, 20
    )
    assert ready == [req]


def _queued(rx, req):
    """``req`` as the scheduler queues it: a stand-in whose ``finished()`` is its ``done``."""
    sched_req = types.SimpleNamespace(rid=req.rid, done=False)
    sched_req.finished = lambda: sched_req.done
    rx.request_queued(sched_req)
    return sched_req


@pytest.mark.parametrize(
    "cached, held",
    [
        (
            16,
            [0],
        ),  # item 0 inside the cached prefix, item 1 straddles its end: sent whole
        (23, [0, 1]),  # both inside (capped at T - 1): no rows at all
        (0, []),  # nothing cached: everything sent
    ],
)
def test_held_items_are_not_sent_and_stay_locked_until_the_request_is_over(
    peers, make_lang, group, cached, held
) -> None:
    """The reservation names the items wholly inside the cached prefix; the encoder's
    payload without their rows is accepted, its other rows arrive byte for byte, the held
    items become items without rows; the prefix stays locked (eviction cannot take it)
    until the scheduler's request finished, then it is released."""
    peer = peers(k=K)
    lang = make_lang(k=K, prefix_match=True)
    tree = _tree(cached)
    rx = _adapter(lang, tree, group)
    room = new_room()
    req = _request(f"skip-{cached}", peer.addr, room)
    assert rx.process_waiting_requests([req]) == ([], [])
    peer.call(
        "create_shaped", room, len(IDS), M, [e.to_wire() for e in ITEMS], list(IDS)
    )
    w = rx.waiting_list[0]
    _until_reserved(rx, w)
    assert w.receiver.held == tuple(held)
    # The Reserve is on its way to the encoder; it holds the items once it arrived.
    assert wait_until(
        lambda: peer.call("poll", room)[0] == KVPoll.WaitingForInput, 20
    ), peer.call("poll", room)
    assert peer.call("held", room) == held
    locked = cached if held else 0
    assert tree.protected_size() == locked
    payload = _payload(held)
    _send_round(peer, rx, room, payload, req)
    items = req.mm_inputs.mm_items
    sent = [i for i in range(len(ITEMS)) if i not in held]
    for i in held:
        assert items[i].precomputed_embeddings.shape[0] == 0
    wide = torch.cat([payload.embeddings, payload.deepstack], dim=1)
    assert torch.equal(
        torch.cat([items[i].precomputed_embeddings for i in sent] or [wide[:0]]),
        wide,
    )
    assert req.mm_inputs.padded_input_ids == padded_ids(IDS, ITEMS)
    # The scheduler has it: still locked, eviction cannot take the held prefix.
    sched_req = _queued(rx, req)
    for _ in range(3):
        rx.process_waiting_requests([])
    assert tree.protected_size() == locked
    tree.evict(EvictParams(num_tokens=100))
    assert tree.total_size() == (cached if held else 0)
    sched_req.done = True
    rx.process_waiting_requests([])
    assert tree.protected_size() == 0 and rx.holds.num_held == 0
    tree.evict(EvictParams(num_tokens=100))
    assert tree.total_size() == 0
    peer.assert_idle()


# The request's M-RoPE positions and delta, as an encoder announces them (any [3, T] values
# whose rows differ: the language side must take them as they are).
POSITIONS = torch.stack([torch.arange(len(IDS)) + 100 * row for row in range(3)])
DELTA = -3


def _create_announcing_positions(peer, room) -> None:
    peer.call(
        "create_shaped",
        room,
        len(IDS),
        M,
        [e.to_wire() for e in ITEMS],
        list(IDS),
        POSITIONS.flatten().tolist(),
        DELTA,
    )


def test_every_item_held_needs_no_block_and_no_round(peers, make_lang, group) -> None:
    """Both items inside the cached prefix, and the encoder announced the positions: the
    request is ready in the very adapter iteration that matched it, without a block (every
    block of the language pool is taken meanwhile, so a reservation would wait) and without
    a round: the encoder's room succeeds with no payload (``AllHeld``; no vision tower). The
    request carries the announced ids, positions and delta exactly, its items without rows;
    the prefix stays locked until the request is over, then every block and lock is free.
    """
    peer = peers(k=K)
    lang = make_lang(k=K, prefix_match=True, num_blocks=4)
    tree = _tree(23)
    rx = _adapter(lang, tree, group)
    taken = lang.allocator.alloc(4, owner="test")
    room = new_room()
    req = _request("all-held", peer.addr, room)
    assert rx.process_waiting_requests([req]) == ([], [])
    w = rx.waiting_list[0]
    _create_announcing_positions(peer, room)
    assert wait_until(lambda: w.receiver.match_wanted() is not None, 20)
    assert rx.process_waiting_requests([]) == ([req], [])
    assert w.receiver.handle is None and w.receiver.held == (0, 1)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    taken.free()
    assert list(req.input_ids) == IDS
    mm = req.mm_inputs
    assert torch.equal(mm.mrope_positions, POSITIONS)
    assert mm.mrope_position_delta.tolist() == [[DELTA]]
    assert [i.precomputed_embeddings.shape[0] for i in mm.mm_items] == [0, 0]
    assert mm.padded_input_ids == padded_ids(IDS, ITEMS)
    sched_req = _queued(rx, req)
    rx.process_waiting_requests([])
    assert tree.protected_size() == 23
    sched_req.done = True
    rx.process_waiting_requests([])
    assert tree.protected_size() == 0 and rx.holds.num_held == 0
    peer.assert_idle()


def test_a_full_control_queue_makes_a_held_request_reserve_as_usual(
    peers, make_lang, group, monkeypatch
) -> None:
    """Every item held and the positions announced, but the control queue to the encoder
    refuses the ``AllHeld`` (``ControlChannel.send`` returns False where ZMQ's non-blocking
    send raises ``zmq.Again``: its SNDHWM is full; injected here, since filling 10,000
    queued messages is not what this test is about). The language side then reserves as
    usual instead of waiting silently: its round-0 reservation names both items held, the
    encoder sends a round without rows, and the request arrives with the round's data.
    Every block is free afterwards (``make_lang``)."""
    from sglang.srt.disaggregation.encode_language.manifest import AllHeld

    peer = peers(k=K)
    lang = make_lang(k=K, prefix_match=True)
    refused = []
    send = lang.channel.send

    def full_for_all_held(endpoint, msg):
        if isinstance(msg, AllHeld):
            refused.append(msg.room)
            return False
        return send(endpoint, msg)

    monkeypatch.setattr(lang.channel, "send", full_for_all_held)
    tree = _tree(23)
    rx = _adapter(lang, tree, group)
    room = new_room()
    req = _request("all-held-refused", peer.addr, room)
    assert rx.process_waiting_requests([req]) == ([], [])
    w = rx.waiting_list[0]
    _create_announcing_positions(peer, room)
    _until_reserved(rx, w)
    assert refused == [room]
    assert w.receiver.handle is not None and w.receiver.held == (0, 1)
    assert tree.protected_size() == 23  # what it said it holds stays held meanwhile
    assert wait_until(
        lambda: peer.call("poll", room)[0] == KVPoll.WaitingForInput, 20
    ), peer.call("poll", room)
    assert peer.call("held", room) == [0, 1]
    payload = _payload([0, 1])
    payload.mrope_delta = DELTA - 1  # the round's data, not the announcement's
    _send_round(peer, rx, room, payload, req)
    assert list(req.input_ids) == IDS
    assert req.mm_inputs.mrope_positions.tolist() == payload.mrope_positions.tolist()
    assert req.mm_inputs.mrope_position_delta.tolist() == [[payload.mrope_delta]]
    assert [i.precomputed_embeddings.shape[0] for i in req.mm_inputs.mm_items] == [0, 0]
    _queued(rx, req).done = True
    rx.process_waiting_requests([])
    assert tree.protected_size() == 0 and rx.holds.num_held == 0
    peer.assert_idle()


def test_an_all_held_the_room_cannot_take_fails_the_room(peers, make_lang) -> None:
    """A misbehaving language peer answers ``AllHeld`` for a request announced without
    positions: the encoder fails the room instead of waiting for a reservation that will
    never come, and says so (a receiver still waiting, as here, fails with the reason; ours
    sends ``AllHeld`` only once it counts the request as received, and drops the Abort).
    """
    from sglang.srt.disaggregation.encode_language.manifest import AllHeld, make

    peer = peers(k=K)
    lang = make_lang(k=K, prefix_match=True)
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call(
        "create_shaped", room, len(IDS), M, [e.to_wire() for e in ITEMS], list(IDS)
    )
    assert wait_until(lambda: rx.match_wanted() is not None, 20)
    lang.channel.send(
        peer.addr,
        make(AllHeld, room=room, manager_id=lang.manager_id),
    )
    status, reason = peer.call("wait", room, 20)
    assert status == KVPoll.Failed
    assert "invalid all_held: the request was announced without M-RoPE positions" in (
        reason
    )
    assert wait_final(lang, rx) == KVPoll.Failed
    assert "invalid all_held" in rx.reason
    peer.assert_idle()


def test_abort_while_locked_releases_the_lock(peers, make_lang, group) -> None:
    """A request aborted after its reservation named held items: the lock is released in
    the same iteration, the encoder's room ends, every block is free."""
    peer = peers(k=K)
    lang = make_lang(k=K, prefix_match=True)
    tree = _tree(16)
    rx = _adapter(lang, tree, group)
    room = new_room()
    req = _request("skip-abort", peer.addr, room)
    rx.process_waiting_requests([req])
    peer.call(
        "create_shaped", room, len(IDS), M, [e.to_wire() for e in ITEMS], list(IDS)
    )
    w = rx.waiting_list[0]
    _until_reserved(rx, w)
    assert tree.protected_size() == 16
    ready, aborts = rx.process_waiting_requests([AbortReq(rid=req.rid)])
    assert aborts == [(req.rid, "aborted by the client", 400)]
    assert tree.protected_size() == 0 and rx.waiting_list == []
    assert wait_final(lang, w.receiver) == KVPoll.Failed
    assert peer.call("wait", room, 20)[0] == KVPoll.Failed
    peer.assert_idle()


def test_handed_over_but_never_queued_is_released(peers, make_lang, group) -> None:
    """A request handed to the scheduler that the scheduler refused on arrival (never
    queued): its lock ends after the next iterations; one the scheduler dropped from its
    queue (``request_released``) at once."""
    tree = _tree(16)
    holds = PrefixHolds(tree)
    node = tree.match_prefix(
        MatchPrefixParams(key=RadixKey(array("q", padded_ids(IDS, ITEMS)[:16])))
    ).last_device_node
    holds.hand_over("a", tree.lock(node))
    holds.hand_over("b", tree.lock(node))
    b = types.SimpleNamespace(rid="b", finished=lambda: False)
    holds.queued(b)
    assert tree.protected_size() == 16 and holds.num_held == 2
    holds.sweep()
    holds.sweep()
    assert holds.num_held == 1  # "a" was never queued
    holds.released(b)
    assert holds.num_held == 0 and tree.protected_size() == 0


def _held_node(tree):
    return tree.match_prefix(
        MatchPrefixParams(key=RadixKey(array("q", padded_ids(IDS, ITEMS)[:16])))
    ).last_device_node


def test_a_request_whose_grammar_compiles_keeps_its_hold_until_queued(
    peers, make_lang, group
) -> None:
    """A constrained request (``json_schema``, ``regex``...) whose grammar is not cached
    waits in the scheduler's grammar queue and is queued only once it compiled, iterations
    later: its held prefix stays locked meanwhile, and until the request is over."""
    tree = _tree(16)
    rx = _adapter(make_lang(k=K, prefix_match=True), tree, group)
    rx.holds.hand_over("c", tree.lock(_held_node(tree)))
    compiling = types.SimpleNamespace(rid="c", finished=lambda: False)
    rx.scheduler.grammar_manager.grammar_queue.append(compiling)
    for _ in range(5):  # iterations while the grammar compiles
        assert rx.process_waiting_requests([]) == ([], [])
    assert rx.holds.num_held == 1 and tree.protected_size() == 16
    rx.scheduler.grammar_manager.grammar_queue.clear()
    done = types.SimpleNamespace(rid="c", finished=lambda: False)
    rx.request_queued(done)  # compiled: the scheduler queues it
    rx.process_waiting_requests([])
    rx.process_waiting_requests([])
    assert rx.holds.num_held == 1 and tree.protected_size() == 16
    done.finished = lambda: True
    rx.process_waiting_requests([])
    assert rx.holds.num_held == 0 and tree.protected_size() == 0


def test_a_lora_request_holds_nothing(peers, make_lang, group) -> None:
    """A LoRA request's prefix is keyed in the adapter's namespace (``Req`` appends the
    adapter to its extra key): a base-model prefix of the same ids is not its own, so
    nothing is held and the encoder sends every item's rows."""
    tree = _tree(24)  # the base model's cache holds both images
    holds = PrefixHolds(tree)
    base = types.SimpleNamespace(extra_key=None, cache_salt=None, lora_id=None)
    held, lock = holds.match(base, IDS, [e.to_wire() for e in ITEMS])
    holds.release(lock)
    assert held == [0, 1]
    lora = types.SimpleNamespace(extra_key=None, cache_salt=None, lora_id="adapter-1")
    assert holds.match(lora, IDS, [e.to_wire() for e in ITEMS]) == ([], None)


def test_holds_lock_at_most_half_the_pool(peers, make_lang, group) -> None:
    """A hold is taken only while at most half of the KV pool is locked (locked tokens
    cannot be evicted: holds filling the pool would leave no room to admit anyone): the
    request then holds nothing and its rows are sent."""
    wire = [e.to_wire() for e in ITEMS]
    request = types.SimpleNamespace(extra_key=None, cache_salt=None, lora_id=None)
    small = PrefixHolds(_tree(24, pool_tokens=48))  # 23 of 48 locked: held
    held, lock = small.match(request, IDS, wire)
    assert held == [0, 1] and small.tree_cache.protected_size() == 23
    small.release(lock)
    tiny = PrefixHolds(_tree(24, pool_tokens=40))  # 23 of 40 would be locked: not held
    assert tiny.match(request, IDS, wire) == ([], None)
    assert tiny.tree_cache.protected_size() == 0


def test_a_held_prefix_keeps_the_server_from_idling(peers, make_lang, group) -> None:
    """While a prefix is held for a request the scheduler has, the adapter is not idle (so
    ``/flush_cache``, which needs an idle server, cannot reset the tree under the lock);
    once the request finished and the next iteration released it, it is."""
    tree = _tree(16)
    rx = _adapter(make_lang(k=K, prefix_match=True), tree, group)
    assert rx.idle()
    node = tree.match_prefix(
        MatchPrefixParams(key=RadixKey(array("q", padded_ids(IDS, ITEMS)[:16])))
    ).last_device_node
    rx.holds.hand_over("e", tree.lock(node))
    req = types.SimpleNamespace(rid="e", done=False)
    req.finished = lambda: req.done
    rx.request_queued(req)
    rx.process_waiting_requests([])
    assert not rx.idle() and tree.protected_size() == 16
    req.done = True
    rx.process_waiting_requests([])
    assert rx.idle() and tree.protected_size() == 0


def test_the_waiting_scheduler_is_woken_by_each_state_it_must_act_on(
    peers, make_lang, group, monkeypatch
) -> None:
    """``sleep_until_progress`` (the language scheduler's sleep while its requests wait for
    rows, bounded at 30 s here instead of 50 ms) returns once the announcement waits for the
    prefix match, once the transfer succeeded, and once a second request failed by the
    encoder's abort: each is posted by the transport, none waits for the bound; with nothing
    waiting it returns at once."""
    import zmq

    from sglang.srt.disaggregation.encode_language import language_mm_receiver

    monkeypatch.setattr(language_mm_receiver, "PROGRESS_WAIT_MAX_S", 30.0)
    peer = peers(k=K)
    lang = make_lang(k=K, prefix_match=True)
    rx = _adapter(lang, _tree(0), group)
    ctx = zmq.Context()
    sockets = [ctx.socket(zmq.PULL) for _ in range(2)]
    for i, sock in enumerate(sockets):
        sock.bind(f"inproc://scheduler-{i}")
    rx.scheduler.ipc_channels = types.SimpleNamespace(
        recv_from_tokenizer=sockets[0], recv_from_rpc=sockets[1]
    )
    rx._progress_poller = None

    def sleep() -> float:
        t0 = time.monotonic()
        rx.sleep_until_progress()
        return time.monotonic() - t0

    try:
        assert sleep() < 1.0  # nothing waits: no sleep
        room = new_room()
        req = _request("wake", peer.addr, room)
        rx.process_waiting_requests([req])
        w = rx.waiting_list[0]
        lang.scheduler_wakeups.drain()
        peer.call(
            "create_shaped", room, len(IDS), M, [e.to_wire() for e in ITEMS], list(IDS)
        )
        assert sleep() < 10.0 and w.receiver.match_wanted() is not None
        _until_reserved(rx, w)
        lang.scheduler_wakeups.drain()
        peer.call("send_payload", room, _payload([]))
        assert sleep() < 10.0 and w.receiver.poll() == KVPoll.Success
        ready: list = []
        assert wait_until(
            lambda: ready.extend(rx.process_waiting_requests([])[0]) or ready, 20
        )
        room = new_room()
        rx.process_waiting_requests([_request("wake-fail", peer.addr, room)])
        w = rx.waiting_list[0]
        peer.call(
            "create_shaped", room, len(IDS), M, [e.to_wire() for e in ITEMS], list(IDS)
        )
        _until_reserved(rx, w)
        lang.scheduler_wakeups.drain()
        peer.call("abort", room)
        assert sleep() < 10.0 and w.receiver.poll() == KVPoll.Failed
        rx.process_waiting_requests([])
        assert rx.waiting_list == []
    finally:
        for sock in sockets:
            sock.close()
        ctx.term()
    peer.assert_idle()
