"""The encode side as a real second process, driven over a pipe by the tests."""
from __future__ import annotations

import os
import signal
import traceback

import el_helpers  # noqa: F401  (sets the Mooncake TCP environment)
from el_helpers import make_payload

from sglang.srt.disaggregation.encode_language.sender import EncodeManager


def peer_main(conn, buffer_config, conn_config) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mgr = EncodeManager(buffer_config, conn_config)
    senders = {}
    H, K = buffer_config.hidden_size, buffer_config.deepstack_count
    conn.send(("ok", (mgr.bootstrap_addr, os.getpid())))
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
            elif cmd == "create":
                (room,) = args
                senders[room] = mgr.create_sender(room)
                out = None
            elif cmd == "send":
                room, seed, total, mm = args
                if room not in senders:
                    senders[room] = mgr.create_sender(room)
                senders[room].send(make_payload(seed, total, mm, H, K, buffer_config.embed_dtype))
                out = None
            elif cmd == "wait":
                room, timeout = args
                s = senders.pop(room)
                out = (int(s.wait(timeout)), s.reason)
            elif cmd == "poll":
                s = senders[args[0]]
                out = (int(s.poll()), s.reason)
            elif cmd == "abort":
                senders[args[0]].abort()
                out = None
            elif cmd == "room_state":
                out = mgr.room_state(args[0])
            elif cmd == "probe":
                out = mgr.probe(args[0])
            elif cmd == "state":
                out = dict(
                    free=mgr.allocator.num_free(),
                    total=mgr.allocator.num_total(),
                    rooms=mgr.num_active_rooms(),
                    rejected=mgr.channel.rejected,
                    refused_registrations=mgr.refused_registrations,
                    thread_errors=mgr.thread_errors,
                    workers_alive=all(w.is_alive() for w in mgr._workers),
                    control_alive=mgr._thread.is_alive(),
                )
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", out))
        except Exception as e:  # report to the test, keep serving
            conn.send(("err", (type(e).__name__, str(e), traceback.format_exc())))



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

    from sglang.srt.disaggregation.base.conn import KVPoll
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
