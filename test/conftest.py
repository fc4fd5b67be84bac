"""Shared fixtures: real SGLang servers (one per configuration, shared across tests), tiny
checkpoints, and server logs attached to the report of a failing test."""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest

from epd_testbed import servers as srv

# Servers use ~3.5 GB each; keep at most this many alive, stopping the least recently used.
MAX_LIVE_SERVERS = int(os.environ.get("EPD_MAX_LIVE_SERVERS", "3"))
LOG_DIR = Path(os.environ.get("EPD_LOG_DIR", Path(__file__).resolve().parents[1] / "results" / "server-logs"))


class ServerPool:
    """Launches each distinct configuration once and reuses it across tests."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.live: OrderedDict[object, list[srv.Server]] = OrderedDict()

    def _admit(self, key: object, need: int) -> None:
        while self.live and self._sglang_servers() + need > MAX_LIVE_SERVERS:
            _, old = self.live.popitem(last=False)
            for s in old:
                s.stop()

    def _sglang_servers(self) -> int:
        """Live SGLang servers (a router or a mooncake_master weighs little)."""
        return sum(
            s.spec.model_path not in ("router", "mooncake_master")
            for group in self.live.values()
            for s in group
        )

    def get(self, spec: srv.ServerSpec) -> srv.Server:
        group = self.live.get(spec)
        if group and all(s.alive() for s in group):
            self.live.move_to_end(spec)
            return group[0]
        self._drop(spec)
        self._admit(spec, 1)
        server = srv.launch(spec, self.log_dir)
        self.live[spec] = [server]
        return server

    def get_upstream_epd(self, model_path: str) -> tuple[srv.Server, srv.Server]:
        return self._group(("upstream-epd", model_path), 2,
                           lambda: srv.launch_upstream_epd(model_path, self.log_dir))

    def get_encode_language(self, model_path: str, language_module: str = "sglang.launch_server",
                            name: str = "el") -> tuple[srv.Server, srv.Server, srv.Server]:
        """(router, encode, language) of one encode/language deployment."""
        return self._group(("encode-language", model_path, language_module), 2,
                           lambda: srv.launch_encode_language(model_path, self.log_dir,
                                                              language_module=language_module, name=name))

    def get_two_encoders_language(self, model_path: str) -> tuple:
        """(router, encode A, encode B, language) of the failure-path deployment."""
        return self._group(("two-encoders-language", model_path), 3,
                           lambda: srv.launch_two_encoders_language(model_path, self.log_dir))

    def get_production(self, model_path: str) -> tuple:
        """(router, encode A, encode B, language) at production defaults
        (``srv.launch_production``): shared by the burst and encoder-crash tests."""
        return self._group(("production", model_path), 3,
                           lambda: srv.launch_production(model_path, self.log_dir))

    def get_global_cache(self, model_path: str) -> tuple:
        """(router, encode A, encode B, language, mooncake_master): encoders sharing rows
        through ``--enable-mm-global-cache`` (``srv.launch_global_cache``)."""
        return self._group(("global-cache", model_path), 3,
                           lambda: srv.launch_global_cache(model_path, self.log_dir))

    def _group(self, key: object, need: int, start) -> tuple:
        """A group of servers launched and stopped together; ``need`` counts SGLang servers."""
        group = self.live.get(key)
        if group and all(s.alive() for s in group):
            self.live.move_to_end(key)
            return tuple(group)
        self._drop(key)
        self._admit(key, need)
        group = list(start())
        self.live[key] = group
        return tuple(group)

    def _drop(self, key: object) -> None:
        for s in self.live.pop(key, []):
            s.stop()

    def stop_all(self) -> None:
        while self.live:
            _, group = self.live.popitem()
            for s in group:
                s.stop()


_POOL_KEY = pytest.StashKey[ServerPool]()
_USED_KEY = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def server_pool(request: pytest.FixtureRequest):
    pool = ServerPool(LOG_DIR)
    request.config.stash[_POOL_KEY] = pool
    yield pool
    pool.stop_all()


@pytest.fixture()
def servers(server_pool: ServerPool, request: pytest.FixtureRequest):
    """Per-test handle on the pool that remembers which servers the test used (for its report)."""
    used: list[srv.Server] = []
    request.node.stash[_USED_KEY] = used

    class Handle:
        def get(self, spec: srv.ServerSpec) -> srv.Server:
            s = server_pool.get(spec)
            used.append(s)
            return s

        def upstream_epd(self, model_path: str) -> tuple[srv.Server, srv.Server]:
            pair = server_pool.get_upstream_epd(model_path)
            used.extend(pair)
            return pair

        def encode_language(self, model_path: str, **kwargs) -> tuple[srv.Server, srv.Server, srv.Server]:
            group = server_pool.get_encode_language(model_path, **kwargs)
            used.extend(group)
            return group

        def two_encoders_language(self, model_path: str) -> tuple:
            group = server_pool.get_two_encoders_language(model_path)
            used.extend(group)
            return group

        def production(self, model_path: str) -> tuple:
            """(router, encode A, encode B, language) at production defaults, with a
            production-paced vision tower (``srv.launch_production``)."""
            group = server_pool.get_production(model_path)
            used.extend(group)
            return group

        def global_cache(self, model_path: str) -> tuple:
            """(router, encode A, encode B, language, mooncake_master): two encoders sharing
            rows through a real Mooncake Store (``srv.launch_global_cache``)."""
            group = server_pool.get_global_cache(model_path)
            used.extend(group)
            return group

        def replace(self, old, new) -> None:
            """``new`` (a relaunch of ``old``) takes ``old``'s place in its group."""
            for group in server_pool.live.values():
                group[:] = [new if s is old else s for s in group]
            used.append(new)

    return Handle()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for s in item.stash.get(_USED_KEY, []):
            rep.sections.append((f"server log: {s.spec.name} :{s.port} (pid {s.pid})", s.log_tail()))


# The served encode/language modules, in the order they run (after every other test): modules
# that share a deployment run next to each other, so the pool (at most MAX_LIVE_SERVERS) starts
# each deployment once. The shared encode/language group serves test_serving, then
# test_serving_prefix_skip, then the first tests of test_serving_coverage; the production group
# serves the burst test and then the crash test, which kills it.
SERVED_MODULE_ORDER = (
    "test_serving.py",
    "test_serving_prefix_skip.py",
    "test_serving_coverage.py",
    "test_serving_admission.py",
    "test_serving_burst.py",
    "test_serving_crash.py",
    "test_serving_faults.py",
    "test_serving_global_cache.py",
    "test_serving_tp.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SERVED_MODULE_ORDER)}
    order = sorted(enumerate(items), key=lambda p: (rank.get(p[1].path.name, -1), p[0]))
    items[:] = [item for _, item in order]
