"""``EncodeManager.fail_room``: a request the encode server refused before it had a sender (its
tokenizer could not load the image) fails the room on the language side at once, whether the
language side expected the request before the failure (Abort) or expects it after (the
tombstone refuses the Expect with the same reason instead of opening a room that waits for a
timeout)."""

from __future__ import annotations

from conftest import new_room, ok_transfer, wait_final
from el_helpers import wait_until

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.receiver import Phase

REASON = "client error: the request's media cannot be used: no such file"


def test_fail_room_after_expect(peers, make_lang):
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    assert wait_until(lambda: rx.phase == Phase.ANNOUNCE, 10)
    peer.call("fail_room", room, REASON)
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason == f"encoder {peer.addr} aborted: {REASON}"
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_expect_after_the_failure_is_refused_with_its_reason(peers, make_lang):
    peer = peers()
    lang = make_lang()
    room = new_room()
    peer.call("fail_room", room, REASON)
    rx = lang.create_receiver(peer.addr, room)
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason == f"encoder {peer.addr} aborted: request already failed: {REASON}"
    ok_transfer(peer, lang)
    peer.assert_idle()
