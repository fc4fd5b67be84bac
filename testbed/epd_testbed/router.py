"""``python -m sglang_router.launch_router`` as the test bed runs it: the same parser and the same
Rust router (``sglang_router.launch_router.main``), without importing the package's debugging-only
Python load balancer (``sglang_router.mini_lb``, used only with ``--mini-lb``), whose import
loads all of sglang: 10 of the 14 seconds a router took to start on this machine, on the critical
path of every deployment (the router starts once its workers are ready)."""

from __future__ import annotations

import sys
import types


class _NoMiniLB:
    def __init__(self, *args, **kwargs) -> None:
        raise SystemExit(
            "epd_testbed.router: --mini-lb is not supported; use sglang_router.launch_router"
        )


def main() -> None:
    sys.modules["sglang_router.mini_lb"] = types.SimpleNamespace(
        MiniLoadBalancer=_NoMiniLB
    )
    from sglang_router.launch_router import main as launch_router_main

    launch_router_main()


if __name__ == "__main__":
    main()
