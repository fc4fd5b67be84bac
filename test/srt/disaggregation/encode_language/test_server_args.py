"""Buffer sizes and transfer settings come from the server arguments (patch 0001)."""

from __future__ import annotations

import argparse

import pytest
from sglang.srt.disaggregation.encode_language.buffers import MultimodalBufferConfig
from sglang.srt.disaggregation.encode_language.connection import ConnectionConfig
from sglang.srt.server_args import ServerArgs


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
    assert conn == ConnectionConfig()  # the documented defaults, unchanged


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
