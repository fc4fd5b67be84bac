"""Deployment across nodes (issue 7 item 14): encode and language peers in two network namespaces
of this machine (``netns.node_pair``: a veth pair, 10.77.0.1 and 10.77.0.2, no shared loopback),
real Mooncake TCP transfers between them. No peer sets SGLANG_HOST_IP: each advertises what
upstream's discovery finds in its namespace (the veth address)."""

from __future__ import annotations

import functools
import time

import netns
import pytest
from conftest import RESERVE, B, EncodePeer, buffer_config, conn_config, new_room
from el_helpers import assert_same, make_payload
from el_peer import language_peer_main, peer_main

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.connection import ControlChannel
from sglang.srt.disaggregation.encode_language.manifest import Ping, make
from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
    get_mooncake_transfer_engine,
)

BOOTSTRAP_PORT = 8998  # upstream's default --disaggregation-bootstrap-port: free in a fresh namespace
WRONG = "10.77.0.9"  # on the veth subnet, owned by nobody
SECOND = "10.77.0.3"  # a second address of node b, not the one discovery finds
K = 3
BOOTSTRAP_TIMEOUT_S = 2.0  # of the peers that meet a wrong address


@pytest.fixture(scope="module")
def nodes():
    with netns.node_pair() as pair:
        yield pair


@pytest.fixture(scope="module")
def start_peer(mp_ctx):
    """Peers started inside a namespace; all stopped at the end of the module."""
    started = []

    def start(node, main, **cc):
        target = functools.partial(netns.run_in, node.netns, main)
        p = EncodePeer(mp_ctx, buffer_config(K), conn_config(**cc), target=target)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


@pytest.fixture(scope="module")
def encoder(nodes, start_peer):
    """The encode side on node b, bound to every interface, listening on the bootstrap port."""
    return start_peer(
        nodes[1],
        peer_main,
        bootstrap_port=BOOTSTRAP_PORT,
        bind_host="0.0.0.0",
        bootstrap_timeout_s=2 * BOOTSTRAP_TIMEOUT_S,
    )


def assert_language_idle(lang) -> None:
    st = lang.state()
    assert (st["rooms"], st["free"], st["thread_errors"]) == (0, st["total"], 0), st


def test_cross_node_transfer_is_byte_exact(nodes, encoder, start_peer):
    """issue 7 item 14: the language side dials the address the router hands out (bootstrap host
    + --disaggregation-bootstrap-port); ids and Mooncake sessions name the discovered veth
    addresses, not the bind address (0.0.0.0) or loopback; data arrives byte-exact, over several
    resume rounds too; one Mooncake engine per process, upstream's shared one, on the configured
    GPU id."""
    node_a, node_b = nodes
    assert encoder.addr == f"{node_b.address}:{BOOTSTRAP_PORT}"
    lang = start_peer(node_a, language_peer_main, gpu_id=1)
    st = lang.state()
    assert st["manager_id"].rsplit(":", 1)[0] == node_a.address
    assert st["session_id"].rsplit(":", 1)[0] == node_a.address
    assert st["shared_engine"] and st["engine_gpu_id"] == 1
    for seed, (total, mm) in enumerate(
        [(1, 1), (B + 1, 4), (5 * RESERVE, 3 * RESERVE + 3)]
    ):
        room = new_room()
        lang.call("receive", f"{node_b.address}:{BOOTSTRAP_PORT}", room)
        encoder.call("send", room, seed, total, mm)
        assert encoder.call("wait", room, 30) == (KVPoll.Success, "")
        status, finished, reason, got = lang.call("wait", room, 30)
        assert (status, finished) == (KVPoll.Success, True), reason
        assert_same(got, make_payload(seed, total, mm, buffer_config(K).hidden_size, K))
    encoder.assert_idle()
    assert_language_idle(lang)


REACHES = ["loopback", "second_address", "advertised_unreachable"]


@pytest.mark.parametrize("reach", REACHES)
def test_encoder_reached_at_another_address_than_it_advertises(
    nodes, start_peer, reach
):
    """issue: blockers item 5: the encoder's control socket binds --host (``bind_host``, as
    ``ConnectionConfig.from_server_args`` sets it) while it advertises what discovery finds; the
    language side dials the address the router hands out (the --prefill URL's host), learns the
    encoder's id from its RegisterAck and names it by the dialled endpoint. ``loopback``: one
    host, --host 127.0.0.1, the router's URL on 127.0.0.1 (the test bed's serving setup);
    ``second_address``: two hosts, the encoder bound to an address of its host other than the
    discovered one; ``advertised_unreachable``: the encoder advertises an address nobody owns,
    bound to every interface (only the language side's address must be reachable). The request
    waits with its reservation in place for longer than the heartbeats allow a missed pong
    (pings answered both ways), then arrives byte-exact, over several rounds too; no block is
    held after."""
    node_a, node_b = nodes
    # --host, the router's --prefill URL host, where the language side runs, advertise_host
    bind, url_host, lang_node, advertise = {
        "loopback": ("127.0.0.1", "127.0.0.1", node_b, None),
        "second_address": (SECOND, SECOND, node_a, None),
        "advertised_unreachable": ("0.0.0.0", node_b.address, node_a, WRONG),
    }[reach]
    if reach == "second_address":
        netns.add_address(node_b, SECOND)
    port = BOOTSTRAP_PORT + 2 + REACHES.index(reach)  # one encoder per case
    enc = start_peer(
        node_b,
        peer_main,
        bootstrap_port=port,
        bind_host=bind,
        advertise_host=advertise,
        bootstrap_timeout_s=BOOTSTRAP_TIMEOUT_S,
    )
    assert enc.addr == f"{advertise or node_b.address}:{port}"  # the manager id
    dial = f"{url_host}:{port}"
    lang = start_peer(lang_node, language_peer_main)
    assert lang.state()["manager_id"].rsplit(":", 1)[0] == lang_node.address
    cc = conn_config()
    hold = 2 * cc.heartbeat_max_failures * cc.heartbeat_interval_s
    for seed, (total, mm) in enumerate([(B + 1, 4), (3 * RESERVE, 2 * RESERVE)]):
        room = new_room()
        lang.call("receive", dial, room)
        # First request: its write hangs longer than a missed pong is tolerated, with a live
        # room on both sides, so heartbeats run both ways (each side answers the other).
        if seed == 0:
            enc.call("stall_next_write", "hang")
        enc.call("send", room, seed, total, mm)
        if seed == 0:
            time.sleep(hold)
            assert enc.call("poll", room)[0] == KVPoll.Transferring
            enc.call("release_write")
        assert enc.call("wait", room, 30) == (KVPoll.Success, "")
        status, finished, reason, got = lang.call("wait", room, 30)
        assert (status, finished) == (KVPoll.Success, True), reason
        assert_same(got, make_payload(seed, total, mm, buffer_config(K).hidden_size, K))
    enc.assert_idle()
    assert_language_idle(lang)


def test_one_encoder_through_two_addresses_is_refused(nodes, encoder, start_peer):
    """issue: blockers item 5: a language side that reaches one encoder through two addresses
    (two routers naming it differently) cannot tell its messages apart by sender: the second
    registration fails at once naming both addresses; the first address keeps serving.
    """
    node_b = nodes[1]
    lang = start_peer(node_b, language_peer_main)
    first, second = f"127.0.0.1:{BOOTSTRAP_PORT}", f"{node_b.address}:{BOOTSTRAP_PORT}"
    for seed, dial in enumerate([first, second, first]):
        room = new_room()
        lang.call("receive", dial, room)
        if dial == second:
            status, finished, reason, got = lang.call("wait", room, 10)
            assert (status, finished, got) == (KVPoll.Failed, True, None)
            assert reason == (
                f"encoder {second} is registered here through {first} already; one encoder "
                f"reached through two addresses ({first}, {second}) is not supported: give "
                "the router one URL per encoder"
            )
            continue
        encoder.call("send", room, seed, B + 1, 4)
        assert encoder.call("wait", room, 30) == (KVPoll.Success, "")
        status, finished, reason, got = lang.call("wait", room, 30)
        assert (status, finished) == (KVPoll.Success, True), reason
        assert_same(got, make_payload(seed, B + 1, 4, buffer_config(K).hidden_size, K))
    encoder.assert_idle()
    assert_language_idle(lang)


def test_wrong_advertised_address_fails_clearly(nodes, encoder, start_peer):
    """issue 7 item 14: a language side that advertises an address nobody owns (bound to every
    interface, as behind a misconfigured NAT) fails the request on both sides with an error
    naming the addresses, within the bootstrap timeout (bounded waits), and leaks no block. (An
    encoder's advertised address need not be reachable: the test above.)"""
    node_a, node_b = nodes
    timeout = BOOTSTRAP_TIMEOUT_S
    enc = encoder
    lang = start_peer(
        node_a,
        language_peer_main,
        advertise_host=WRONG,
        bind_host="0.0.0.0",
        bootstrap_timeout_s=timeout,
    )
    dial = f"{node_b.address}:{BOOTSTRAP_PORT}"
    lang_id = lang.state()["manager_id"]
    room = new_room()
    lang.call("receive", dial, room)
    enc.call("send", room, 1, B + 1, 4)
    # the slower side's bootstrap timeout, plus slack for a busy machine
    bound = 2 * timeout + 10
    enc_status, enc_reason = enc.call("wait", room, bound, timeout=bound + 10)
    status, finished, reason, got = lang.call("wait", room, bound, timeout=bound + 10)
    assert (status, finished, got) == (KVPoll.Failed, True, None)
    # The language side pings the encoder from registration on: missed pongs end it first.
    assert reason.startswith(
        f"peer {dial} is unreachable (missed 3 heartbeats)"
    ), reason
    assert f"this side's advertised address {lang_id}" in reason
    assert enc_status == KVPoll.Failed
    assert "bootstrap timeout: no language server expected the request" in enc_reason
    enc.assert_idle()
    assert_language_idle(lang)


def test_advertised_address_not_on_this_host_is_a_construction_error(nodes, make_lang):
    """issue 7 item 14: advertising an address this host does not own, without a separate bind
    address, fails at once naming the address (node a's address lives only in its namespace).
    """
    with pytest.raises(
        OSError, match=f"cannot bind the control socket to {nodes[0].address}:0"
    ):
        make_lang(advertise_host=nodes[0].address)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]"])
def test_wildcard_advertise_host_is_an_error(make_lang, host):
    """issue 7 item 14: a wildcard is a bind address, never a manager id."""
    with pytest.raises(
        ValueError, match="is a wildcard, not an address peers can reach"
    ):
        make_lang(advertise_host=host)


def test_bind_all_keeps_a_routable_manager_id(make_lang):
    """issue 7 item 14: binding 0.0.0.0 does not leak into the manager id or the session."""
    lang = make_lang(bind_host="0.0.0.0")
    host = lang.manager_id.rsplit(":", 1)[0]
    assert host not in ("0.0.0.0", "127.0.0.1")


def test_one_transfer_engine_per_process(make_lang):
    """issue 7 item 14: every manager of a process uses SGLang's shared Mooncake engine."""
    a, b = make_lang(), make_lang()
    assert a.engine is b.engine is get_mooncake_transfer_engine()
    assert a.session_id == b.session_id and a.manager_id != b.manager_id


def test_control_channel_over_ipv6():
    """issue 7 item 14: bound to every IPv6 interface, the id is the bracketed advertised
    address, and a peer's channel reaches it there."""
    rx = ControlChannel("::", 0, "::1")
    tx = ControlChannel("::1", 0, "::1")
    try:
        assert rx.endpoint.startswith("[::1]:")
        assert tx.send(rx.endpoint, make(Ping, manager_id=tx.endpoint, nonce=7))
        msg = rx.recv(10.0)
        assert isinstance(msg, Ping) and (msg.manager_id, msg.nonce) == (tx.endpoint, 7)
    finally:
        rx.close()
        tx.close()
