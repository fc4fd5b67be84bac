"""The language scheduler's adapter (``LanguageMMReceiver``) around the transport, without
servers: its own methods are driven in-process as the scheduler's request receiver calls them
(``process_waiting_requests`` with each iteration's requests, ``abort_waiting_requests`` for
the scheduler's abort path).

* Aborts around completion: a real ``LanguageManager`` here and a real encode peer (another
  process, Mooncake TCP) transfer the request; the abort reaches the adapter after the control
  thread set Success, or in the iteration the request becomes ready. Either way the request
  fails with the abort (400), never runs, and every block is free on both sides.
* ``--tp 2``: two gloo ranks; an exception on one rank while allocating the buffers of the
  received rows or attaching them fails the request on both, so the batches of the two ranks
  stay the same and neither waits in a collective the other left.
* Bootstrap address lookups: typed faults, cached, and looked up off the scheduler's thread.

What the scheduler would run on an admitted request is replaced by test doubles (the
scheduler object, ``_attach``, the context-length check): they need a loaded model.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import types

import pytest
import torch
import torch.distributed as dist
from conftest import new_room, wait_final
from el_helpers import run_two_ranks, wait_until

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglang.srt.sampling.sampling_params import SamplingParams

IMAGE_TOKEN = 7


def _adapter(manager, group, rank: int = 0, num_ranks: int = 1):
    """A ``LanguageMMReceiver`` over ``manager`` with a stand-in scheduler; admitted requests
    are recorded instead of attached to a model's inputs."""
    from sglang.srt.disaggregation.encode_language.connection import PeerLookups
    from sglang.srt.disaggregation.encode_language.language_mm_receiver import (
        LanguageMMReceiver,
    )
    from sglang.srt.disaggregation.encode_language.metrics import EncodeLanguageMetrics

    rx = object.__new__(LanguageMMReceiver)
    rx.peer_lookups = PeerLookups()  # this test's own table
    rx.scheduler = types.SimpleNamespace(
        attn_tp_cpu_group=group,
        attn_tp_group=types.SimpleNamespace(
            first_rank=0, cpu_group=group, device_group=group
        ),
        device="cpu",
        max_req_input_len=4096,
    )
    rx.placeholder_ids = {IMAGE_TOKEN}
    rx.rank, rx.num_ranks, rx.is_owner = rank, num_ranks, rank == 0
    rx.manager = manager
    rx.waiting_list = []
    rx.metrics = EncodeLanguageMetrics("language", enabled=False)
    rx.attached = []
    rx.holds = None  # no prefix cache (test_prefix_skip.py has one)
    rx._attach = lambda recv_req, data, left_out=(): rx.attached.append(recv_req.rid)
    rx._check_context_length = lambda recv_req: None
    rx._req_for_error = lambda recv_req: recv_req.rid
    return rx


def _request(rid: str, encoder: str, room: int) -> TokenizedGenerateReqInput:
    host, port = encoder.rsplit(":", 1)
    return TokenizedGenerateReqInput(
        rid=rid,
        input_text="",
        input_ids=[1, IMAGE_TOKEN, 2],
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


@pytest.fixture(scope="module")
def single_rank_group():
    """A one-rank gloo group: the poll agreement's all-reduce of a TP 1 server."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        yield dist.group.WORLD
        dist.destroy_process_group()
    else:
        yield dist.group.WORLD


def _transferred(peers, make_lang, single_rank_group, rid: str):
    """(adapter, request, encode peer) once the request's transfer succeeded: the control
    thread set Success, the adapter has not polled since."""
    peer = peers()
    lang = make_lang()
    rx = _adapter(lang, single_rank_group)
    room = new_room()
    req = _request(rid, peer.addr, room)
    ready, aborts = rx.process_waiting_requests([req])
    assert (ready, aborts) == ([], []) and len(rx.waiting_list) == 1
    peer.call("send", room, 1, 40, 20)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx.waiting_list[0].receiver) == KVPoll.Success
    return rx, req, peer


def test_abort_after_the_transfer_succeeded_fails_the_request(
    peers, make_lang, single_rank_group
) -> None:
    """issue: blockers item 7. The scheduler handles an AbortReq (``abort_waiting_requests``)
    after the control thread set Success and before the adapter's next poll: the next
    iteration fails the request with the abort instead of admitting it."""
    rx, req, peer = _transferred(peers, make_lang, single_rank_group, "abort-after")
    rx.abort_waiting_requests(AbortReq(rid=req.rid))
    ready, aborts = rx.process_waiting_requests([])
    assert ready == [] and rx.attached == []
    assert aborts == [(req.rid, "aborted by the client", 400)]
    assert rx.waiting_list == []
    peer.assert_idle()  # make_lang: every language block free


def test_abort_in_the_iteration_the_request_becomes_ready(
    peers, make_lang, single_rank_group
) -> None:
    """issue: blockers item 7. The AbortReq arrives in the same iteration as the request's
    Success: the adapter's poll would hand the request to the scheduler after the scheduler
    handled the abort (the abort passes through first). It fails the request instead; the
    AbortReq still passes through, and the scheduler's own call afterwards changes nothing.
    """
    rx, req, peer = _transferred(peers, make_lang, single_rank_group, "abort-same")
    abort = AbortReq(rid=req.rid)
    ready, aborts = rx.process_waiting_requests([abort])
    assert ready == [abort] and rx.attached == []
    assert aborts == [(req.rid, "aborted by the client", 400)]
    rx.abort_waiting_requests(abort)  # what the scheduler's abort path calls next
    assert rx.process_waiting_requests([]) == ([], [])
    peer.assert_idle()


def test_a_request_without_abort_is_admitted(
    peers, make_lang, single_rank_group
) -> None:
    """The same transfer without an abort: admitted (the two tests above fail because of
    the abort, not the set-up); an abort of another rid changes nothing."""
    rx, req, peer = _transferred(peers, make_lang, single_rank_group, "no-abort")
    other = AbortReq(rid="another-request")
    ready, aborts = rx.process_waiting_requests([other])
    assert ready == [other, req] and aborts == [] and rx.attached == [req.rid]
    peer.assert_idle()


# --tp 2: ranks agree on failures after the rows arrived -----------------------------------------
class _Arrived:
    """The owner's receiver of a request whose rows arrived (``take()`` returns them)."""

    reason = None

    def __init__(self, data) -> None:
        self.data = data

    def poll(self) -> int:
        return KVPoll.Success

    def take(self):
        return self.data

    def abort(self, reason: str = "") -> None:
        pass


class _NoTransfer(_Arrived):
    """The owner's receiver of a request the encoder finished without media."""

    reason = (
        "encoder aborted: the request has no image or video for its placeholder tokens"
    )

    def __init__(self) -> None:
        from sglang.srt.disaggregation.encode_language.manifest import FaultKind

        self.kind = FaultKind.NO_TRANSFER

    def poll(self) -> int:
        return KVPoll.Failed


def _received():
    from sglang.srt.disaggregation.encode_language.payload import ReceivedData

    mask = torch.tensor([False, True, False])
    rows = torch.randn(1, 8)
    return ReceivedData(
        manifest=types.SimpleNamespace(mrope_delta=0),
        fill_ids=torch.tensor([1, IMAGE_TOKEN, 2]),
        mrope_positions=torch.zeros(3, 3, dtype=torch.int64),
        mm_mask=mask,
        embeddings=rows[:, :4],
        deepstack=rows[:, 4:],
        items=({"modality": "image", "offsets": [[1, 1]], "hash": 5},),
        rows=rows,
    )


def _tp_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank that left a collective the other waits in fails the test in seconds.
    dist.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20)
    )
    from sglang.srt.disaggregation.encode_language.language_mm_receiver import (
        WaitingRequest,
        _FollowerPoll,
    )

    rx = _adapter(None, dist.group.WORLD, rank=rank, num_ranks=2)
    empty = torch.empty
    if rank == 1:
        # "a": allocating the buffer of its rows fails on rank 1 only (on a GPU: a CUDA OOM
        # in torch.empty); "b": attaching its rows raises on rank 1 only.
        rows_shape = tuple(_received().rows.shape)
        failures = ["rank-local allocation failure"]

        def failing_empty(*args, **kwargs):
            shape = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
            if failures and tuple(shape) == rows_shape:
                raise RuntimeError(failures.pop())
            return empty(*args, **kwargs)

        torch.empty = failing_empty

        def attach(recv_req, data, left_out=()):
            if recv_req.rid == "b":
                raise RuntimeError("rank-local failure")
            rx.attached.append(recv_req.rid)

        rx._attach = attach
    for rid in ("a", "b", "c", "d"):
        receiver = _Arrived(_received()) if rank == 0 else _FollowerPoll()
        if rid == "c" and rank == 0:
            receiver = _NoTransfer()
        rx.waiting_list.append(
            WaitingRequest(_request(rid, "127.0.0.1:1", 1), receiver, 0.0)
        )
    try:
        ready, aborts = rx.process_waiting_requests([])
    finally:
        torch.empty = empty
    results[rank] = ([r.rid for r in ready], aborts, rx.attached)
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_tp_ranks_agree_on_a_rank_local_failure() -> None:
    """issue: blockers item 8 (TP ranks agree on failure), and review finding 3 of item 8.
    Rows of three requests arrive on both ranks. Allocating the buffer for the rows of "a"
    fails on rank 1 only: both ranks still join every collective of "a" (they agree on the
    allocation before the rows travel) and fail it. Attaching "b" raises on rank 1 only:
    both fail it (a MAX all-reduce of the failures, as upstream's ``_finalize_shm_features``).
    "d" is admitted on both. Request "c", which the encoder finished without media (item 6:
    only the owner's receiver knows), runs as it is on both ranks."""
    owner, follower = run_two_ranks(_tp_worker)
    assert owner[0] == follower[0] == ["c", "d"]
    assert "a" not in owner[2] + follower[2]  # its rows reached neither rank's requests
    assert follower[1] == [
        (
            "a",
            "received multimodal data is invalid: rank-local allocation failure",
            500,
        ),
        ("b", "received multimodal data is invalid: rank-local failure", 500),
    ]
    assert owner[1] == [
        ("a", "received multimodal data is invalid on another TP rank", 500),
        ("b", "received multimodal data is invalid on another TP rank", 500),
    ]


# Bootstrap address lookups -------------------------------------------------------------------
def test_bootstrap_address_lookups_are_cached_and_typed(monkeypatch) -> None:
    """issue: blockers item 3(a). Looking up a request's ``bootstrap_host``: a name that
    resolves is kept ``ttl_s``, one that names no host (EAI_NONAME) or does not parse is the
    request's fault (``FaultKind.CLIENT``, 400) and kept ``failed_ttl_s``; a lookup that failed
    for now (EAI_AGAIN: the resolver did not answer) is ``FaultKind.UNAVAILABLE`` (503, the
    router counts it against the server) and not kept. getaddrinfo is a test double (this
    machine has no DNS the test controls) under upstream's ``NetworkAddress``; the clock is
    the lookups' own."""
    import socket

    from sglang.srt.disaggregation.encode_language import connection
    from sglang.srt.disaggregation.encode_language.manifest import FaultKind

    calls = []

    def getaddrinfo(host, *args):
        calls.append(host)
        if host == "encoder.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 0))]
        if host == "flaky.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    now = [100.0]
    lookups = connection.PeerLookups(clock=lambda: now[0])

    def fault(addr: str) -> FaultKind:
        with pytest.raises(connection.PeerAddressError, match="cannot be") as e:
            lookups.lookup(addr)
        return e.value.kind

    for _ in range(3):
        assert lookups.lookup("encoder.test:8998") == "10.1.2.3:8998"
        assert fault("no-such-host.invalid:8998") == FaultKind.CLIENT
        assert fault("flaky.test:8998") == FaultKind.UNAVAILABLE
        assert fault("encoder.test:port") == FaultKind.CLIENT  # does not parse
    assert calls.count("encoder.test") == 1
    assert calls.count("no-such-host.invalid") == 1
    assert calls.count("flaky.test") == 3
    now[0] += lookups.ttl_s + 1  # past both periods: looked up again
    assert lookups.lookup("encoder.test:8998") == "10.1.2.3:8998"
    assert fault("no-such-host.invalid:8998") == FaultKind.CLIENT
    assert calls.count("encoder.test") == 2
    assert calls.count("no-such-host.invalid") == 2


def test_bootstrap_lookups_serve_the_last_answer_and_bound_the_queue() -> None:
    """issue: blockers item 3(a). A resolver blip after a name's entry expired answers the
    last good endpoint (the encoder did not move because DNS hiccuped), a name never resolved
    fails 503; lookups running at once are bounded: one more answers 503 at once instead of
    queueing in front of the encoder's own name. The resolver is a test double."""
    from sglang.srt.disaggregation.encode_language import connection
    from sglang.srt.disaggregation.encode_language.manifest import FaultKind

    healthy, release = [True], threading.Event()

    def resolve(addr: str) -> str:
        host = addr.rsplit(":", 1)[0]
        if host.startswith("slow"):
            assert release.wait(30)
        if not healthy[0]:
            raise connection.PeerAddressError("resolver down", FaultKind.UNAVAILABLE)
        return "10.1.2.3:" + addr.rsplit(":", 1)[1]

    now = [0.0]
    lookups = connection.PeerLookups(
        resolve=resolve, clock=lambda: now[0], max_pending=2
    )
    assert lookups.lookup("encoder.test:8998") == "10.1.2.3:8998"
    now[0] += lookups.ttl_s + 1
    healthy[0] = False
    assert lookups.lookup("encoder.test:8998") == "10.1.2.3:8998"
    with pytest.raises(connection.PeerAddressError) as e:
        lookups.lookup("other.test:8998")
    assert e.value.kind == FaultKind.UNAVAILABLE
    healthy[0] = True
    running = [lookups.lookup_async(f"slow{i}.test:1") for i in range(2)]
    refused = lookups.lookup_async("slow2.test:1")
    assert refused.done() and not any(f.done() for f in running)
    assert isinstance(refused.exception(), connection.PeerAddressError)
    assert refused.exception().kind == FaultKind.UNAVAILABLE
    release.set()
    assert [f.result(30) for f in running] == ["10.1.2.3:1", "10.1.2.3:1"]
    assert lookups.lookup_async("slow2.test:1").result(30) == "10.1.2.3:1"


def test_bootstrap_address_is_looked_up_off_the_scheduler_thread(
    peers, make_lang, single_rank_group
) -> None:
    """issue: blockers item 3(a). A request whose ``bootstrap_host`` is not in the lookup
    table waits in the adapter's waiting list while a worker thread looks it up: the
    scheduler's iterations go on meanwhile (the resolver double blocks until released), then
    the request is received and admitted. A lookup that fails for now answers 503, a name
    that does not exist 400; both fail the request and nothing else. The resolver is a test
    double (no DNS here the test controls): it names the real encode peer's address."""
    from sglang.srt.disaggregation.encode_language import connection
    from sglang.srt.disaggregation.encode_language.manifest import FaultKind

    peer = peers()
    lang = make_lang()
    rx = _adapter(lang, single_rank_group)
    port = peer.addr.rsplit(":", 1)[1]
    release, threads = threading.Event(), []

    def resolve(addr: str) -> str:
        threads.append(threading.current_thread())
        host = addr.rsplit(":", 1)[0]
        if host == "encoder.test":
            assert release.wait(30)  # a slow resolver
            return peer.addr
        kind = FaultKind.UNAVAILABLE if host == "flaky.test" else FaultKind.CLIENT
        raise connection.PeerAddressError(
            f"bootstrap address {addr!r} cannot be used", kind
        )

    rx.peer_lookups = connection.PeerLookups(resolve=resolve)
    room = new_room()
    req = _request("slow-dns", f"encoder.test:{port}", room)
    for _ in range(3):  # the scheduler's iterations while the lookup is pending
        assert rx.process_waiting_requests([req] if _ == 0 else []) == ([], [])
    assert [w.rid for w in rx.waiting_list] == ["slow-dns"]
    release.set()
    assert wait_until(  # the lookup answers: the receiver starts in a next iteration
        lambda: rx.process_waiting_requests([]) == ([], [])
        and lang.num_active_rooms() == 1,
        20,
    )
    peer.call("send", room, 1, 40, 20)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert _iterate_until(rx, []) == ([req], []) and rx.attached == ["slow-dns"]
    refused = [
        _request("flaky", f"flaky.test:{port}", new_room()),
        _request("no-such-host", f"no-such-host.invalid:{port}", new_room()),
    ]
    ready, aborts = _iterate_until(rx, refused, count=2)
    assert ready == []
    assert sorted((rid, status) for rid, _, status in aborts) == [
        ("flaky", 503),
        ("no-such-host", 400),
    ]
    assert all("cannot be used" in error for _, error, _ in aborts)
    assert rx.waiting_list == []
    assert threading.main_thread() not in threads and len(threads) == 3
    peer.assert_idle()


def _iterate_until(rx, recv_reqs, count: int = 1, timeout: float = 20.0):
    """The scheduler's iterations, the first with ``recv_reqs``, until ``count`` requests
    left the waiting list (bounded): (ready, aborts) of all of them."""
    ready, aborts = [], []
    deadline = time.monotonic() + timeout
    while len(ready) + len(aborts) < count:
        assert time.monotonic() < deadline, "the request never left the waiting list"
        r, a = rx.process_waiting_requests(recv_reqs)
        recv_reqs = []
        ready += r
        aborts += a
        time.sleep(0.01)
    return ready, aborts


def test_a_room_in_use_on_tp_2_is_a_client_fault() -> None:
    """issue: blockers item 8 (typed faults). With ``--tp > 1`` a request whose bootstrap
    room is in use fails through the poll agreement, by the owner's refused stand-in: it is
    answered 400, as on TP 1, on either side (the encode side's stand-in had no kind: 500).
    """
    from sglang.srt.disaggregation.encode_language.encode_request_faults import (
        status_of_transfer_failure,
    )
    from sglang.srt.disaggregation.encode_language.encode_scheduler import (
        _RefusedSender,
    )
    from sglang.srt.disaggregation.encode_language.language_mm_receiver import (
        _RefusedPoll,
    )

    reason = "bootstrap room 1 is already in use"
    assert status_of_transfer_failure(_RefusedSender(reason)) == 400
    assert status_of_transfer_failure(_RefusedPoll(reason)) == 400
