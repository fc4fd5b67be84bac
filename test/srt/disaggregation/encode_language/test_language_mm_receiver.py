"""The language scheduler's adapter (``LanguageMMReceiver``) around the transport, without
servers: its own methods are driven in-process as the scheduler's request receiver calls them
(``process_waiting_requests`` with each iteration's requests, ``abort_waiting_requests`` for
the scheduler's abort path).

* Aborts around completion: a real ``LanguageManager`` here and a real encode peer (another
  process, Mooncake TCP) transfer the request; the abort reaches the adapter after the control
  thread set Success, or in the iteration the request becomes ready. Either way the request
  fails with the abort (400), never runs, and every block is free on both sides.
* ``--tp 2``: two gloo ranks; an exception on one rank while attaching the received rows fails
  the request on both, so the batches of the two ranks stay the same.

What the scheduler would run on an admitted request is replaced by test doubles (the
scheduler object, ``_attach``, the context-length check): they need a loaded model.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import new_room, wait_final

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglang.srt.sampling.sampling_params import SamplingParams

IMAGE_TOKEN = 7


def _adapter(manager, group, rank: int = 0, num_ranks: int = 1):
    """A ``LanguageMMReceiver`` over ``manager`` with a stand-in scheduler; admitted requests
    are recorded instead of attached to a model's inputs."""
    from sglang.srt.disaggregation.encode_language.language_mm_receiver import (
        LanguageMMReceiver,
    )
    from sglang.srt.disaggregation.encode_language.metrics import EncodeLanguageMetrics

    rx = object.__new__(LanguageMMReceiver)
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
    rx._attach = lambda recv_req, data: rx.attached.append(recv_req.rid)
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
    from sglang.srt.disaggregation.encode_language.buffers import ReceivedData

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
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from sglang.srt.disaggregation.encode_language.language_mm_receiver import (
        WaitingRequest,
        _FollowerPoll,
    )

    rx = _adapter(None, dist.group.WORLD, rank=rank, num_ranks=2)
    if rank == 1:  # a rank-local failure while attaching the rows of request "a"

        def attach(recv_req, data):
            if recv_req.rid == "a":
                raise RuntimeError("rank-local failure")
            rx.attached.append(recv_req.rid)

        rx._attach = attach
    for rid in ("a", "b", "c"):
        receiver = _Arrived(_received()) if rank == 0 else _FollowerPoll()
        if rid == "c" and rank == 0:
            receiver = _NoTransfer()
        rx.waiting_list.append(
            WaitingRequest(_request(rid, "127.0.0.1:1", 1), receiver, 0.0)
        )
    ready, aborts = rx.process_waiting_requests([])
    results[rank] = ([r.rid for r in ready], aborts)
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_tp_ranks_agree_on_a_rank_local_failure() -> None:
    """issue: blockers item 8 (TP ranks agree on failure). Rows of two requests arrive on both
    ranks; attaching request "a" raises on rank 1 only. Both ranks fail "a" and admit "b"
    (a MAX all-reduce of the failures, as upstream's ``_finalize_shm_features``). Request "c",
    which the encoder finished without media (item 6: only the owner's receiver knows), runs
    as it is on both ranks."""
    from epd_testbed.servers import free_port

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _tp_worker, args=(free_port(), results), nprocs=2, start_method="spawn"
        )
        owner, follower = results[0], results[1]
    assert owner[0] == follower[0] == ["c", "b"]
    assert follower[1] == [
        ("a", "received multimodal data is invalid: rank-local failure", 500)
    ]
    assert owner[1] == [
        ("a", "received multimodal data is invalid on another TP rank", 500)
    ]


# Bootstrap address lookups on the scheduler thread -------------------------------------------
def test_bootstrap_address_lookups_are_cached(monkeypatch) -> None:
    """issue: blockers item 3(a). The language scheduler resolves each image request's
    ``bootstrap_host``: a name is looked up once per ``PEER_LOOKUP_TTL_S`` (a failed one once
    per ``PEER_LOOKUP_FAILED_TTL_S``), not once per request, and an address that cannot be
    used raises ``PeerAddressError`` (a 400 for the request). The resolver is a test double:
    this machine has no DNS whose answers the test controls."""
    import socket

    from sglang.srt.disaggregation.encode_language import connection

    lookups = []

    def getaddrinfo(host, *args):
        lookups.append(host)
        if host == "encoder.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 0))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for _ in range(3):
        assert connection.peer_endpoint("encoder.test:8998") == "10.1.2.3:8998"
        with pytest.raises(connection.PeerAddressError, match="cannot be used"):
            connection.peer_endpoint("no-such-host.invalid:8998")
    with pytest.raises(connection.PeerAddressError, match="'1.2.3.4:5:8998'"):
        connection.peer_endpoint("1.2.3.4:5:8998")
    assert lookups.count("encoder.test") == 1
    assert lookups.count("no-such-host.invalid") == 1
    # past the TTLs: looked up again
    now = connection.time.monotonic()
    monkeypatch.setattr(
        connection.time, "monotonic", lambda: now + connection.PEER_LOOKUP_TTL_S + 1
    )
    assert connection.peer_endpoint("encoder.test:8998") == "10.1.2.3:8998"
    with pytest.raises(connection.PeerAddressError):
        connection.peer_endpoint("no-such-host.invalid:8998")
    assert lookups.count("encoder.test") == 2
    assert lookups.count("no-such-host.invalid") == 2
