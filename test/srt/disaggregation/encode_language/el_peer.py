"""The encode side as a real second process, driven over a pipe by the tests."""

from __future__ import annotations

import os
import signal
import threading
import traceback

import el_helpers  # noqa: F401  (sets the Mooncake TCP environment)
from el_helpers import declare_dead, make_payload, push_endpoints, wait_until

import sglang.srt.disaggregation.encode_language.sender as sender_module
from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.manifest import RequestShape
from sglang.srt.disaggregation.encode_language.sender import EncodeManager


def room_state(mgr, room: int):
    """A snapshot of one encode room, for assertions."""
    with mgr.lock:
        r = mgr.rooms.get(room)
        if r is None:
            return None
        return dict(
            round=r.round,
            expected=r.dest is not None,  # the destination's Expect arrived
            announced=r.announced,
            # the destination reserved the room's current round
            ready=r.dest is not None and r.dest.round == r.round,
            token_sent=r.token_sent,
            mm_sent=r.mm_sent,
            in_flight=r.in_flight,
            has_payload=r.payload is not None,
        )


def sender_ended(mgr, room: int, sender) -> bool:
    """``sender`` is Success or Failed and its room is dropped: a failed room is dropped only
    once no write for it is in flight (its status says Failed as soon as it fails)."""
    with mgr.lock:
        r = mgr.rooms.get(room)
        held = r is not None and r.sender is sender
    return sender.poll() in (KVPoll.Success, KVPoll.Failed) and not held


STALLED_WRITES = []  # (first part's ret, late part's ret) of "sigstop_mid" writes
# the unwritten rest of "fail_in_flight" / "raise_in_flight" writes, landed on the test's command
STRAGGLERS = []


def stall_next_write(mgr, mode: str, release: threading.Event) -> None:
    """Fault injection into the next transfer-engine write of this (real) encoder process; the
    write itself stays real:

    * ``"sigstop_mid"``: write every segment but the multimodal rows (the last two, embeddings
      and deepstack, when the blocks are contiguous), then SIGSTOP this whole process, and
      write the rest once the test's SIGCONT arrived: an encoder stalled mid-write at a known
      point (the test cannot hit a random point reliably).
    * ``"hang"``: the write blocks until ``release`` is set (bounded: 120 s), then runs. A hung
      Mooncake write cannot be produced on loopback without stopping the test process itself.
      ``"hang_fail"``: the same, then it reports -1 (as Mooncake does for a write that failed
      in part).
    * ``"fail_in_flight"``: a fake engine call that stands in for Mooncake returning -1 while
      part of the batch is still in flight (one task FAILED while others wait, a slice
      TIMEOUT, or Mooncake's own deadline: ``batchTransferSync``), which cannot be provoked on
      loopback TCP. It writes every segment but the multimodal rows (the last two), returns -1
      at once, and keeps the rows (no aux segment: a straggler carries none) for
      ``land_straggler``, which writes them, really, whenever the test says.
      ``"raise_in_flight"``: the same, but the call raises (as the engine's binding may, after
      part of the batch was submitted) instead of returning -1.
    """
    real = sender_module.write_segments  # the encoder's one transfer-engine write
    continued = threading.Event()
    if mode == "sigstop_mid":  # handlers are installed from the main thread (this one)
        signal.signal(signal.SIGCONT, lambda *_: continued.set())

    def stalled(engine, session_id, srcs, dsts, lens):
        sender_module.write_segments = real  # one write only
        if mode in ("fail_in_flight", "raise_in_flight"):
            real(engine, session_id, srcs[:-2], dsts[:-2], lens[:-2])
            STRAGGLERS.append((session_id, srcs[-2:], dsts[-2:], lens[-2:]))
            if mode == "raise_in_flight":
                raise RuntimeError("transfer engine error")
            return -1
        if mode in ("hang", "hang_fail"):
            release.wait(120)
            ret = real(engine, session_id, srcs, dsts, lens)
            return -1 if mode == "hang_fail" else ret
        ret = real(engine, session_id, srcs[:-2], dsts[:-2], lens[:-2])
        os.kill(os.getpid(), signal.SIGSTOP)
        # The rest only after the test's SIGCONT, however late the stop takes hold here.
        continued.wait(120)
        late = real(engine, session_id, srcs[-2:], dsts[-2:], lens[-2:])
        STALLED_WRITES.append((ret, late))
        return min(ret, late)

    sender_module.write_segments = stalled


def scheduler_poll():
    """The schedulers' poll, imported on first use: its upstream module costs ~8 s of CPU to
    import, which a peer must not spend while a heartbeat watches it (the forkserver does not
    preload it, to keep every test session's start fast)."""
    from sglang.srt.disaggregation.encode_language.encode_request_faults import (
        poll_and_end_failed,
    )

    return poll_and_end_failed


def poll_as_scheduler(transfer, failure_prob: float) -> int:
    """What the schedulers poll a transfer with (``poll_and_end_failed``: upstream's
    ``poll_and_all_reduce``, over a one-rank gloo group here) with upstream's fault injection
    ``SGLANG_TEST_DISAGG_FAILURE_PROB`` set to ``failure_prob``."""
    import torch.distributed as dist

    from sglang.srt.environ import envs

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with envs.SGLANG_TEST_DISAGG_FAILURE_PROB.override(failure_prob):
            return int(scheduler_poll()([transfer], dist.group.WORLD)[0])
    finally:
        if owned:
            dist.destroy_process_group()


def peer_main(conn, buffer_config, conn_config) -> None:
    """The encode side as a real process: one EncodeManager, its senders driven by the test."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mgr = EncodeManager(buffer_config, conn_config)
    senders = {}
    H, K = buffer_config.hidden_size, buffer_config.deepstack_count
    release = threading.Event()

    def handle(cmd, args):
        if cmd == "create":  # the request arrives: room, its shape (total, mm tokens)
            room, total, mm = args
            senders[room] = mgr.create_sender(room, RequestShape(total, mm))
        elif cmd == "send":
            room, seed, total, mm = args
            payload = make_payload(seed, total, mm, H, K, buffer_config.embed_dtype)
            if room not in senders:
                senders[room] = mgr.create_sender(
                    room, RequestShape(total, mm, payload.items)
                )
            senders[room].send(payload)
        elif cmd == "create_shaped":  # room, RequestShape fields (with items and ids)
            senders[args[0]] = mgr.create_sender(args[0], RequestShape(*args[1:]))
        elif cmd == "held":  # the items every destination holds (once WaitingForInput)
            return senders[args[0]].held_items()
        elif cmd == "send_payload":  # room, a payload the test built
            senders[args[0]].send(args[1])
        elif cmd == "wait":  # bounded: until the sender ended (Success or Failed)
            room, timeout = args
            s = senders.pop(room)
            wait_until(lambda: sender_ended(mgr, room, s), timeout)
            return int(s.poll()), s.reason
        elif cmd == "poll":
            s = senders[args[0]]
            return int(s.poll()), s.reason
        elif cmd == "fault":  # what failed a sender, as its scheduler sees it
            s = senders[args[0]]
            return int(s.poll()), s.reason, s.kind
        elif cmd == "abort":  # room[, reason, kind]
            senders[args[0]].abort(*args[1:])
        elif cmd == "poll_scheduler":  # the schedulers' poll, in a one-rank group
            return poll_as_scheduler(senders[args[0]], *args[1:])
        elif cmd == "load_scheduler_poll":  # ~8 s of imports, while nothing is live
            scheduler_poll()
        elif cmd == "fail_room":  # a request the tokenizer refused before admission
            mgr.fail_room(*args)
        elif cmd == "room_state":
            return room_state(mgr, args[0])
        elif cmd == "declare_dead":  # what the heartbeat does after missed pongs
            declare_dead(mgr, args[0])
        elif cmd == "stall_next_write":
            release.clear()
            stall_next_write(mgr, args[0], release)
        elif cmd == "stalled_writes":
            return list(STALLED_WRITES)
        elif cmd == "land_straggler":  # the rest of a "*_in_flight" write lands now
            return mgr.engine.batch_transfer_sync(*STRAGGLERS.pop())
        elif cmd == "release_write":
            release.set()
        elif cmd == "state":
            return dict(
                free=mgr.allocator.num_free(),
                total=mgr.allocator.num_total(),
                rooms=mgr.num_active_rooms(),
                rejected=mgr.channel.rejected,
                peers=sorted(mgr.peers),
                health={ep: h.dead for ep, h in mgr.health.items()},
                push_endpoints=push_endpoints(mgr.channel),
                quarantined=mgr.allocator.num_quarantined(),
                inflight_payload_bytes=mgr.inflight_payload_bytes,
                pending_writes=len(mgr._pending_writes),
                thread_errors=mgr.thread_errors,
                workers_alive=all(w.is_alive() for w in mgr._workers),
                control_alive=mgr._thread.is_alive(),
            )
        else:
            raise ValueError(f"unknown command {cmd}")
        return None

    serve(conn, mgr, handle)


def serve(conn, mgr, handle) -> None:
    """The pipe protocol of every peer: announce (manager id, pid), then answer each
    command with ("ok", handle(cmd, args)) or ("err", (type, message, traceback))."""
    conn.send(("ok", (mgr.manager_id, os.getpid())))
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        try:
            if cmd == "exit":
                mgr.close()
                conn.send(("ok", None))
                break
            conn.send(("ok", handle(cmd, args)))
        except Exception as e:  # report to the test, keep serving
            conn.send(("err", (type(e).__name__, str(e), traceback.format_exc())))


def language_peer_main(conn, buffer_config, conn_config) -> None:
    """The language side as a real process (cross-node tests): receives rooms from an
    encoder and reports what arrived."""
    import time

    from sglang.srt.disaggregation.encode_language.receiver import LanguageManager
    from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
        get_mooncake_transfer_engine,
    )

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mgr = LanguageManager(buffer_config, conn_config)
    receivers = {}

    def handle(cmd, args):
        if cmd == "receive":
            bootstrap_addr, room = args
            receivers[room] = mgr.create_receiver(bootstrap_addr, room)
            return None
        if cmd == "wait":  # bounded: Success or Failed, and the blocks back in the pool
            room, timeout = args
            rx = receivers.pop(room)
            deadline = time.monotonic() + timeout
            while not rx.finished and time.monotonic() < deadline:
                time.sleep(0.02)
            status = rx.poll()
            data = rx.take() if status == KVPoll.Success and rx.finished else None
            return int(status), rx.finished, rx.reason, data
        if cmd == "region":  # where an encoder writes: (session id, address, bytes)
            region = mgr.buffers.region
            return mgr.session_id, region.data_ptr(), region.numel()
        if cmd == "region_bytes":  # what landed there
            start, n = args
            return mgr.buffers.region.view(-1)[start : start + n].numpy().tobytes()
        if cmd == "state":
            return dict(
                free=mgr.allocator.num_free(),
                total=mgr.allocator.num_total(),
                rooms=mgr.num_active_rooms(),
                thread_errors=mgr.thread_errors,
                manager_id=mgr.manager_id,
                session_id=mgr.session_id,
                shared_engine=mgr.engine is get_mooncake_transfer_engine(),
                engine_gpu_id=mgr.engine.gpu_id,
            )
        raise ValueError(f"unknown command {cmd}")

    serve(conn, mgr, handle)
