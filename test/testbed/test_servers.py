"""The test bed's server launcher: a router whose port is taken before it binds starts again."""

from __future__ import annotations

import itertools
import socket
import urllib.request

import pytest
from epd_testbed import servers


@pytest.mark.parametrize("taken", ["port", "prometheus_port"])
def test_a_router_whose_port_was_taken_starts_on_others(
    tmp_path, monkeypatch, taken
) -> None:
    """CI saw the router exit (``failed to install Prometheus metrics exporter: Address already
    in use``) when an outbound connection took its picked Prometheus port first: replay that
    for either port, with the first pick of that port held by a listening socket."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        picks = (
            [servers.free_port(), held]
            if taken == "prometheus_port"
            else [held, servers.free_port()]
        )
        real = servers.free_port
        queue = itertools.chain(picks, iter(real, None))
        monkeypatch.setattr(servers, "free_port", lambda: next(queue))
        router = servers._spawn_router((), [], tmp_path, (), "router", retries=False)
        try:
            ports = {
                "port": router.port,
                "prometheus_port": router.extra["prometheus_port"],
            }
            assert held not in ports.values()
            with urllib.request.urlopen(router.url + "/health", timeout=5) as r:
                assert r.status == 200
            with urllib.request.urlopen(
                f"http://127.0.0.1:{ports['prometheus_port']}/metrics", timeout=5
            ) as r:
                assert r.status == 200
            first_log = tmp_path / f"router-{picks[0]}.log"
            assert servers._ROUTER_BIND_FAILED in first_log.read_text()
        finally:
            router.stop()
