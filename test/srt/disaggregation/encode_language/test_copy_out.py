"""Copy-out without the manager lock (issue 16, item 3): while the control thread copies a round
out of the blocks, the scheduler thread's calls (``create_receiver``, ``rx.abort()``) do not
wait for it, and a failure that lands meanwhile frees the round's blocks exactly once, after the
copy. Real encoder processes (conftest ``peers``), real Mooncake; the copy is held open by a
test-only wrapper around the language manager's ``read_round`` (``CopyGate``), so "during the
copy" is an observable state, not a race, and nothing here asserts on timing."""

from __future__ import annotations

import threading

from conftest import RESERVE, H, new_room, ok_transfer, wait_final
from el_helpers import (
    accounting_ok,
    assert_same,
    declare_dead,
    make_payload,
    wait_until,
)

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.manifest import FaultKind

# Bound on a call the fix makes return at once; without it the call waits for the gate, which
# only the test opens (after this bound): a hang guard, not a timing assertion.
HANG_S = 10.0


class CopyGate:
    """Holds the language manager's next copy-out (``buffers.read_round``) open until
    ``release`` is set; ``entered`` says the control thread is in it. Test-only: installed on
    the manager's buffers instance, never in production code."""

    def __init__(self, mgr):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        read = mgr.buffers.read_round
        armed = [True]

        def gated(*args, **kwargs):
            if not armed[0]:
                return read(*args, **kwargs)
            armed[0] = False
            self.entered.set()
            self.release.wait(60)
            try:
                return read(*args, **kwargs)
            finally:
                self.done.set()

        mgr.buffers.read_round = gated


class Frees:
    """Counts block releases per owner (test-only wrapper of the allocator's release)."""

    def __init__(self, allocator):
        self.by_owner = {}
        release = allocator._release_locked

        def counted(handle):
            release(handle)
            self.by_owner[handle.owner] = self.by_owner.get(handle.owner, 0) + 1

        allocator._release_locked = counted


def on_scheduler_thread(fn, gate: CopyGate, what: str):
    """Run ``fn`` on another thread (the scheduler's) while ``gate`` holds a copy open; it must
    return before the copy may end. Opens the gate either way, so a failure does not hang.
    """
    out = {}

    def run():
        out["value"] = fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_S)
    waited = t.is_alive()
    copying = not gate.done.is_set()
    if waited:
        gate.release.set()
        t.join(HANG_S)
    assert not waited, f"{what} waited for the copy-out of a round (the manager lock)"
    assert copying
    return out.get("value")


def test_create_receiver_does_not_wait_for_copy_out(peers, make_lang):
    """issue 16 item 3: a request arriving while a round is copied out (``create_receiver`` on
    the scheduler thread) returns without waiting for the copy; both requests then complete
    with the exact bytes."""
    peer = peers()
    lang = make_lang()
    gate = CopyGate(lang)
    room, other = new_room(), new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("send", room, 7, 3 * RESERVE, 20)  # three rounds; round 0 is held
    assert gate.entered.wait(20), "no round reached the copy-out"
    rx2 = on_scheduler_thread(
        lambda: lang.create_receiver(peer.addr, other), gate, "create_receiver"
    )
    assert rx.copying and not gate.done.is_set()
    gate.release.set()
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success, rx.reason
    assert_same(rx.take(), make_payload(7, 3 * RESERVE, 20, H, 3))
    peer.call("send", other, 8, RESERVE, 5)
    assert peer.call("wait", other, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx2) == KVPoll.Success, rx2.reason
    assert_same(rx2.take(), make_payload(8, RESERVE, 5, H, 3))
    peer.assert_idle()


def test_abort_during_copy_out(peers, make_lang):
    """issue 16 item 3: ``rx.abort()`` while a round of it is copied out returns without
    waiting for the copy and the request is Failed at once; its blocks stay in use while the
    copy reads them, then are freed exactly once (not fenced: the encoder's writes ended with
    its RoundDone), the encoder is told, and the pool's accounting is exact."""
    peer = peers()
    lang = make_lang()
    gate = CopyGate(lang)
    frees = Frees(lang.allocator)
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call(
        "send", room, 3, 3 * RESERVE, 20
    )  # a partial round: the encoder waits on us
    assert gate.entered.wait(20), "no round reached the copy-out"
    blocks = rx.handle.blocks
    on_scheduler_thread(lambda: rx.abort("client went away"), gate, "abort")
    assert rx.poll() == KVPoll.Failed and rx.reason == "client went away"
    # nothing freed while the copy reads the blocks
    assert not rx.finished
    owners = lang.allocator.owners()
    assert [owners.get(b) for b in blocks] == [("room", room)] * len(blocks)
    assert accounting_ok(lang.allocator)["used"] == len(blocks)
    gate.release.set()
    assert wait_final(lang, rx) == KVPoll.Failed
    assert (rx.reason, rx.kind) == ("client went away", FaultKind.INTERNAL)
    assert rx.data is None  # a failed request's partial rows are never handed out
    assert frees.by_owner.get(("room", room)) == 1
    a = accounting_ok(lang.allocator)
    assert (a["used"], a["quarantined"], a["free"]) == (0, 0, a["total"])
    assert not lang.fences and not lang.exposures.blocks and lang.thread_errors == 0
    assert peer.call("wait", room, 10) == (
        KVPoll.Failed,
        f"aborted by language side {lang.manager_id}: client went away",
    )
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_peer_dead_during_copy_out(peers, make_lang):
    """issue 16 item 3: a "peer dead" verdict on the encoder while a round of its request is
    copied out does not wait for the copy and fails the request (unavailable); its blocks are
    freed once after the copy, neither fenced nor exposed. (On the manager the verdict comes
    from the heartbeat on the control thread; the test forces it from another thread, as any
    caller off that thread would, so it lands during the copy.)"""
    peer = peers()
    lang = make_lang()
    gate = CopyGate(lang)
    frees = Frees(lang.allocator)
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("send", room, 5, RESERVE, 9)  # one round: the last
    assert gate.entered.wait(20), "no round reached the copy-out"
    blocks = rx.handle.blocks
    on_scheduler_thread(
        lambda: declare_dead(lang, peer.addr), gate, "peer-dead verdict"
    )
    assert rx.poll() == KVPoll.Failed and rx.kind == FaultKind.UNAVAILABLE
    assert not rx.finished
    assert accounting_ok(lang.allocator)["used"] == len(blocks)
    gate.release.set()
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason == "declared dead by the test" and rx.data is None
    assert frees.by_owner.get(("room", room)) == 1
    a = accounting_ok(lang.allocator)
    assert (a["used"], a["quarantined"], a["free"]) == (0, 0, a["total"])
    assert not lang.fences and not lang.exposures.blocks and lang.thread_errors == 0
    # the encoder wrote and finished its last round before the verdict
    assert peer.call("wait", room, 10) == (KVPoll.Success, "")
    assert wait_until(lambda: not lang.peer_is_dead(peer.addr), 10)  # its next pong
    ok_transfer(peer, lang)
    peer.assert_idle()
