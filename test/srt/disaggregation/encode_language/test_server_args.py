"""Buffer sizes and transfer settings come from the server arguments (patch 0005)."""

from __future__ import annotations

import argparse

import pytest

from sglang.srt.disaggregation.encode_language.buffers import MultimodalBufferConfig
from sglang.srt.disaggregation.encode_language.connection import ConnectionConfig
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils.network import NetworkAddress


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(["--model-path", "m", *argv])


def test_defaults() -> None:
    ns = _parse()
    buf = MultimodalBufferConfig.from_server_args(
        ns, hidden_size=2048, deepstack_count=3
    )
    assert (buf.block_size, buf.num_blocks, buf.hidden_size, buf.deepstack_count) == (
        128,
        256,
        2048,
        3,
    )
    conn = ConnectionConfig.from_server_args(ns)
    # The documented defaults, except the port: upstream's --disaggregation-bootstrap-port default.
    assert conn == ConnectionConfig(bootstrap_port=8998)


def test_flags_reach_the_configs() -> None:
    ns = _parse(
        "--disaggregation-mm-num-blocks",
        "64",
        "--disaggregation-mm-block-size",
        "32",
        "--disaggregation-mm-reserve-tokens",
        "512",
        "--disaggregation-mm-transfer-config",
        '{"waiting_timeout_s": 7.5, "heartbeat_interval_s": 1}',
    )
    buf = MultimodalBufferConfig.from_server_args(
        ns, hidden_size=64, deepstack_count=0, embed_dtype="float32"
    )
    assert (buf.block_size, buf.num_blocks, buf.embed_dtype) == (32, 64, "float32")
    conn = ConnectionConfig.from_server_args(ns)
    assert (
        conn.default_reserve_tokens,
        conn.waiting_timeout_s,
        conn.heartbeat_interval_s,
    ) == (512, 7.5, 1)
    assert conn.transfer_timeout_s == ConnectionConfig().transfer_timeout_s


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            '{"waiting_timeout": 1}',
            r"unknown transfer setting\(s\) \['waiting_timeout'\]",
        ),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_transfer_config_is_a_clear_error(raw, message) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionConfig.from_server_args(
            _parse("--disaggregation-mm-transfer-config", raw)
        )


def test_addressing_and_engine_from_server_args() -> None:
    """issue 7 item 14: the encode side listens on --disaggregation-bootstrap-port; the engine takes
    --disaggregation-ib-device (else --mooncake-ib-device, as upstream's engine) and the rank's GPU;
    advertised and bind addresses are transfer settings, unset = discovery / the advertised one.
    """
    ns = _parse(
        "--disaggregation-bootstrap-port", "9100", "--mooncake-ib-device", "mlx5_1"
    )
    conn = ConnectionConfig.from_server_args(ns, gpu_id=3)
    assert (conn.bootstrap_port, conn.ib_device, conn.gpu_id) == (9100, "mlx5_1", 3)
    assert (conn.advertise_host, conn.bind_host) == (None, None)
    ns = _parse(
        "--disaggregation-ib-device",
        "mlx5_0",
        "--mooncake-ib-device",
        "mlx5_1",
        "--disaggregation-mm-transfer-config",
        '{"advertise_host": "10.1.2.3", "bind_host": "0.0.0.0", "bootstrap_port": 9200}',
    )
    conn = ConnectionConfig.from_server_args(ns)
    assert (conn.ib_device, conn.gpu_id, conn.bootstrap_port) == ("mlx5_0", 0, 9200)
    assert conn.resolve_addresses() == ("10.1.2.3", "0.0.0.0")


def test_default_advertised_address_is_upstreams_discovery(monkeypatch) -> None:
    """issue 7 item 14: unset, the advertised address is upstream's get_local_ip_auto, which
    honours SGLANG_HOST_IP; the bind address follows it."""
    monkeypatch.setenv("SGLANG_HOST_IP", "10.9.8.7")
    assert ConnectionConfig().resolve_addresses() == ("10.9.8.7", "10.9.8.7")
    assert ConnectionConfig(advertise_host="10.1.1.1").resolve_addresses() == (
        "10.1.1.1",
        "10.1.1.1",
    )


@pytest.mark.parametrize(
    "argv, bind",
    [
        ((), "127.0.0.1"),  # upstream's --host default
        (("--host", "0.0.0.0"), "0.0.0.0"),
        # a name: bound as the IP upstream's resolver gives the language side for it
        (("--host", "localhost"), NetworkAddress.resolve_host("localhost")),
    ],
    ids=["default-host", "wildcard", "name"],
)
def test_encode_control_socket_binds_host(monkeypatch, argv, bind) -> None:
    """issue: blockers item 5: the encode side's control socket binds --host, as upstream's PD
    bootstrap server, so it listens where the router's --prefill URL sends the language side;
    its manager id still names the advertised (discovered) address. The language side keeps
    binding its advertised address (the encoder dials the id it registers with)."""
    monkeypatch.setenv("SGLANG_HOST_IP", "10.9.8.7")
    enc = ConnectionConfig.from_server_args(
        _parse("--disaggregation-mode", "encode", *argv)
    )
    assert enc.resolve_addresses() == ("10.9.8.7", bind)
    lang = ConnectionConfig.from_server_args(
        _parse("--disaggregation-mode", "language", *argv)
    )
    assert lang.bind_host is None
    assert lang.resolve_addresses() == ("10.9.8.7", "10.9.8.7")


def test_encode_refuses_a_bind_host_override() -> None:
    """issue: blockers item 5: a bind_host on the encode side could move the control socket away
    from the address the router hands out: refused at start-up, naming --host."""
    with pytest.raises(
        ValueError,
        match=r"--disaggregation-mode encode: bind_host in --disaggregation-mm-transfer-config "
        r"is not accepted; the control socket binds --host",
    ):
        ConnectionConfig.from_server_args(
            _parse(
                "--disaggregation-mode",
                "encode",
                "--disaggregation-mm-transfer-config",
                '{"bind_host": "0.0.0.0"}',
            )
        )


def test_unresolvable_bind_host_is_an_error() -> None:
    """issue: blockers item 5: a --host that names no address fails before any socket opens."""
    conn = ConnectionConfig(advertise_host="10.1.1.1", bind_host="no-such-host.invalid")
    with pytest.raises(ValueError, match="Cannot resolve host 'no-such-host.invalid'"):
        conn.resolve_addresses()
