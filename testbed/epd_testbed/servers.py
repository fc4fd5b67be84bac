"""Real `python -m sglang.launch_server` processes for tests, the demo and benchmarks.

A server is a subprocess in its own process group (SGLang forks scheduler and detokenizer
children), on a free loopback port, with its log in a file so a failing test can show it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

# fp32 + no dynamo: the test bed's exactness conditions (see docs/contributing.md).
BASE_ENV = {"TORCHDYNAMO_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
# --sleep-on-idle: an idle scheduler otherwise busy-polls one full core (measured: 10 CPU-seconds
# in 10 idle seconds), which on 2 cores made every other server start 4-5x slower.
BASE_ARGS = ("--dtype", "float32", "--host", "127.0.0.1", "--log-level", "info", "--sleep-on-idle")
DEFAULT_READY_TIMEOUT = float(os.environ.get("EPD_SERVER_READY_TIMEOUT", "600"))


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (SGLang's own pick for a port a
    child binds later): ``bind(0)``'s pick is also one the next outbound connection (a request,
    a Mooncake transfer) may take before the server binds it, which CI saw for a router's
    Prometheus port."""
    from sglang.srt.utils.network import get_free_port_below_ephemeral

    return get_free_port_below_ephemeral()


_BIND_FAILED = "error while attempting to bind on address"  # asyncio's create_server


class ServerError(RuntimeError):
    """A server failed to start or died."""


class RequestError(ServerError):
    """A request to a running server failed (HTTP error, dropped connection, timeout)."""


@dataclass(frozen=True)
class ServerSpec:
    """What to launch: a model and extra `launch_server` arguments. Hashable, so tests that need
    the same configuration share one server."""

    model_path: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    name: str = "server"
    python: str | None = None  # interpreter to launch with; None: the current one (the fork)
    module: str = "sglang.launch_server"  # what `python -m` runs (a test-bed control wraps it)


@dataclass
class Server:
    spec: ServerSpec
    port: int
    proc: subprocess.Popen
    log_path: Path
    started_at: float
    ready_s: float | None = None
    extra: dict = field(default_factory=dict)
    # (python, log_dir) to start again on another port if the picked one is taken; None: the
    # port was given (a relaunch on the same port)
    relaunch_on: tuple[str, Path] | None = None

    def _start(self, python: str, log_dir: Path, port: int) -> None:
        self.port = port
        self.log_path = log_dir / f"{self.spec.name}-{port}.log"
        cmd = [python, "-m", self.spec.module, "--model-path", self.spec.model_path, "--port", str(port),
               *BASE_ARGS, *self.spec.args]
        env = dict(os.environ, **BASE_ENV, **dict(self.spec.env))
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        self.started_at = time.time()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise ServerError(f"{self.spec.name} exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            bind_failed = f"{_BIND_FAILED} ('127.0.0.1', {self.port})"
            if self.relaunch_on is not None and bind_failed in self.log_tail(2000):
                # The port was free when picked, then taken during the start-up (by another
                # server's internal ports): upstream then neither serves nor exits.
                self.stop()
                started_at = self.started_at
                self._start(*self.relaunch_on, free_port())
                self.started_at = started_at  # ready_s: from the first launch
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.ready_s = time.time() - self.started_at
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"{self.spec.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the whole process group at once (SIGKILL): nothing of a test-bed server needs
        a graceful exit, and the alternatives wait: a SIGTERM to the group kills the scheduler
        first, which the main process takes for a crash and sleeps 5 s for diagnostics; a
        SIGTERM to the main process drains for 2-6 s. Not once the main process was reaped: its
        pid, and so the group's id, may belong to another process group by now."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    # ---- requests -------------------------------------------------------------------------
    def post(self, path: str, payload: dict, timeout: float = 300) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RequestError(f"{path} -> HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise RequestError(f"{path} -> {e!r}; server alive={self.alive()}; log tail:\n{self.log_tail(3000)}") from None

    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def flush_cache(self, timeout: float = 30) -> None:
        """Empty the prefix cache: upstream's ``/flush_cache`` waits up to ``timeout`` s for
        the server to be idle, then refuses (HTTP 400, raised as ``HTTPError``)."""
        req = urllib.request.Request(f"{self.url}/flush_cache?timeout={timeout}", method="POST")
        urllib.request.urlopen(req, timeout=timeout + 30).close()


def launch(spec: ServerSpec, log_dir: Path, *, port: int | None = None, wait: bool = True,
           python: str | None = None) -> Server:
    """Start ``python -m sglang.launch_server`` for ``spec``; wait until /health answers.
    The interpreter is ``python``, else ``spec.python``, else the current one. Without
    ``port``, a free one (again another if it is taken before the server binds it)."""
    python = python or spec.python or sys.executable
    log_dir.mkdir(parents=True, exist_ok=True)
    server = Server(spec, 0, None, log_dir, 0.0, relaunch_on=None if port else (python, log_dir))
    server._start(python, log_dir, port or free_port())
    return server.wait_ready() if wait else server


REPO_ROOT = Path(__file__).resolve().parents[2]


def pristine_python() -> str:
    """Python running *unpatched* upstream sglang 0.5.23 (the shared environment without this
    checkout's overlay) with the test bed and the CPU platform plugin: the baseline that fork
    outputs are compared to. Created on first use by ``tools/fork.py env --pristine``."""
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "fork.py"), "env", "--pristine"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def colocated_spec(model_path: str | Path, *args: str, name: str = "colocated") -> ServerSpec:
    return ServerSpec(str(model_path), tuple(args), name=name)


def upstream_epd_specs(model_path: str | Path, *extra: str, backend: str = "zmq_to_scheduler",
                       encoder_port: int | None = None) -> tuple[ServerSpec, ServerSpec, int]:
    """Upstream 0.5.23's own encoder disaggregation: an `--encoder-only` server and a
    `--language-only` server pointed at it (``extra`` to both). This is the side-by-side
    baseline."""
    encoder_port = encoder_port or free_port()
    enc = ServerSpec(str(model_path), ("--encoder-only", "--encoder-transfer-backend", backend, *extra),
                     name="upstream-encoder")
    lang = ServerSpec(
        str(model_path),
        ("--language-only", "--encoder-urls", f"http://127.0.0.1:{encoder_port}",
         "--encoder-transfer-backend", backend, *extra),
        name="upstream-language",
    )
    return enc, lang, encoder_port


def launch_upstream_epd(model_path: str | Path, log_dir: Path, *extra: str,
                        backend: str = "zmq_to_scheduler") -> tuple[Server, Server]:
    enc_spec, lang_spec, enc_port = upstream_epd_specs(model_path, *extra, backend=backend)
    encoder = launch(enc_spec, log_dir, port=enc_port, wait=False)
    language = launch(lang_spec, log_dir, wait=False)
    try:
        encoder.wait_ready()
        language.wait_ready()
    except Exception:
        encoder.stop()
        language.stop()
        raise
    return encoder, language


# Encode/language disaggregation behind SGLang's own router ------------------------------------

# Small buffers so multi-round transfers happen on the tiny checkpoint (K=3, H=128, fp32).
EL_BUFFER_ARGS = ("--disaggregation-transfer-backend", "mooncake", "--enable-metrics",
                  "--disaggregation-mm-num-blocks", "16", "--disaggregation-mm-block-size", "32",
                  "--disaggregation-mm-reserve-tokens", "64",
                  # blocks a dead encoder may still write stay quarantined this long (default 120 s)
                  "--disaggregation-mm-transfer-config", '{"fence_timeout_s": 5}')


# Production defaults (issue 16): the transport's own sizes and timers (256 blocks of 128 tokens,
# 2048 reserved tokens, 120 s fence timeout, default bootstrap/liveness timeouts): no
# --disaggregation-mm-* sizes and no transfer-config overrides. Only what the test bed needs:
# Mooncake named explicitly (it is the default; an operator's command line names it too) and
# metrics, which the tests read the blocks gauge from.
EL_PRODUCTION_ARGS = ("--disaggregation-transfer-backend", "mooncake", "--enable-metrics")


# No SGLANG_HOST_IP: every server advertises upstream's discovered address (the default route's
# source address), as a new user's would, while --host (127.0.0.1) is what the router's URLs and
# the language side's bootstrap_host name; the encoder's control socket binds --host
# (docs/transport.md, "Deploying across nodes / addressing").
EL_ENV: tuple[tuple[str, str], ...] = ()


# Language-side chunk size of the shared test deployment: small enough that chunks cut the
# image spans of the test prompts (deepstack rows must follow their tokens into every chunk).
EL_LANGUAGE_ARGS = ("--chunked-prefill-size", "16")


def encode_language_specs(model_path: str | Path, bootstrap_port: int, *extra: str,
                          language_args: tuple[str, ...] = EL_LANGUAGE_ARGS,
                          encode_args: tuple[str, ...] = (),
                          language_module: str = "sglang.launch_server",
                          name: str = "el",
                          buffer_args: tuple[str, ...] = EL_BUFFER_ARGS,
                          encode_module: str = "sglang.launch_server",
                          encode_env: tuple[tuple[str, str], ...] = ()) -> tuple[ServerSpec, ServerSpec]:
    """An ``--disaggregation-mode encode`` server (control socket on ``bootstrap_port``) and an
    ``--disaggregation-mode language`` server; ``buffer_args`` (the test bed's small pool unless
    given, e.g. ``EL_PRODUCTION_ARGS``) and ``extra`` go to both, ``encode_args`` and
    ``language_args`` to one; ``encode_module``/``encode_env``: a test-bed control wrapping the
    encode server (e.g. ``epd_testbed.slow_vit_server``)."""
    enc = ServerSpec(str(model_path), ("--disaggregation-mode", "encode", "--disaggregation-bootstrap-port",
                                       str(bootstrap_port), *buffer_args, *extra, *encode_args),
                     name=f"{name}-encode", module=encode_module,
                     env=EL_ENV + tuple(encode_env))
    lang = ServerSpec(str(model_path), ("--disaggregation-mode", "language", *buffer_args, *extra,
                                        *language_args), name=f"{name}-language", module=language_module,
                      env=EL_ENV)
    return enc, lang


def bootstrap_port(encoder: Server) -> int:
    """The control-socket port an encode server was launched with."""
    args = encoder.spec.args
    return int(args[args.index("--disaggregation-bootstrap-port") + 1])


def launch_router(prefill: list[tuple[Server, int]], decode: list[Server], log_dir: Path,
                  *extra: str, name: str = "router", retries: bool = False) -> Server:
    """``sglang_router.launch_router --pd-disaggregation`` (run by ``epd_testbed.router``): encode
    servers as prefill workers (URL + bootstrap port), language servers as decode workers. Retries
    are off unless ``retries`` (a retried pair re-encodes) and workers are probed every second at
    start-up."""
    workers = []
    for server, port in prefill:
        workers += ["--prefill", server.url, str(port)]
    for server in decode:
        workers += ["--decode", server.url]
    return _start_router(("--pd-disaggregation",), workers, log_dir, extra, name, retries)


def launch_regular_router(workers: list[Server], log_dir: Path, *extra: str, name: str = "router",
                          policy: str = "round_robin", retries: bool = False) -> Server:
    """``sglang_router.launch_router --worker-urls ...`` (run by ``epd_testbed.router``; regular
    mode: each request to one of ``workers``, by ``policy``; the router's own default is ``cache_aware``)."""
    urls = ["--worker-urls", *(server.url for server in workers), "--policy", policy]
    return _start_router((), urls, log_dir, extra, name, retries)


_ROUTER_BIND_FAILED = "Address already in use"  # the Rust router's panic, either port


def _start_router(mode: tuple[str, ...], workers: list[str], log_dir: Path, extra: tuple[str, ...],
                  name: str, retries: bool) -> Server:
    """The router process (``mode`` flags first, ``workers``: its worker arguments), once
    ``/readiness`` answers; its Prometheus port (the policies' counters) is
    ``extra["prometheus_port"]``."""
    router = _spawn_router(mode, workers, log_dir, extra, name, retries)
    # /health answers before the workers are registered; /readiness only once they are.
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(router.url + "/readiness", timeout=5) as r:
                if r.status == 200:
                    return router
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.time() > deadline:
            router.stop()
            raise ServerError(f"{name}: workers not ready after 120 s:\n{router.log_tail()}")
        time.sleep(0.5)


def _spawn_router(mode: tuple[str, ...], workers: list[str], log_dir: Path, extra: tuple[str, ...],
                  name: str, retries: bool, attempts: int = 3) -> Server:
    """``epd_testbed.router`` on two free ports (HTTP, Prometheus), once ``/health`` answers.
    A port free when picked may be taken before the router binds it (both lie in the range of
    outbound connections' ephemeral ports); the router then exits, and starts again on two
    others."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        port, prometheus_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "epd_testbed.router", *mode,
               "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(prometheus_port),
               "--worker-startup-check-interval", "1", "--log-level", "warn"]
        if not retries:
            cmd.append("--disable-retries")
        cmd += workers + list(extra)
        log_path = log_dir / f"{name}-{port}.log"
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, stdin=subprocess.DEVNULL)
        router = Server(ServerSpec("router", tuple(cmd), name=name), port, proc, log_path,
                        time.time(), extra={"prometheus_port": prometheus_port})
        try:
            return router.wait_ready(timeout=120)
        except ServerError:
            if attempt + 1 == attempts or _ROUTER_BIND_FAILED not in router.log_tail():
                raise


def launch_colocated_replicas(model_path: str | Path, log_dir: Path, *args: str, n: int = 2,
                              name: str = "colocated", policy: str = "round_robin",
                              ) -> tuple[Server, list[Server]]:
    """(router, servers): ``n`` colocated servers (``colocated_spec(model_path, *args)``) behind
    the router in regular mode with ``policy``: what a user runs instead of disaggregating."""
    servers = [launch(colocated_spec(model_path, *args, name=f"{name}-{i}"), log_dir, wait=False)
               for i in range(n)]
    try:
        for server in servers:
            server.wait_ready()
        router = launch_regular_router(servers, log_dir, name=f"{name}-router", policy=policy)
    except BaseException:  # interrupted or failed start: no server left behind
        for server in servers:
            server.stop()
        raise
    return router, servers


def launch_encode_language(model_path: str | Path, log_dir: Path, *extra: str,
                           language_module: str = "sglang.launch_server",
                           language_args: tuple[str, ...] = EL_LANGUAGE_ARGS,
                           encode_args: tuple[str, ...] = (),
                           name: str = "el") -> tuple[Server, Server, Server]:
    """(router, encode, language): one encode and one language server behind the router."""
    router, encoder, (language,) = launch_encode_languages(
        model_path, log_dir, *extra, languages=1, language_module=language_module,
        language_args=language_args, encode_args=encode_args, name=name)
    return router, encoder, language


def launch_encode_languages(model_path: str | Path, log_dir: Path, *extra: str, languages: int = 2,
                            language_module: str = "sglang.launch_server",
                            language_args: tuple[str, ...] = EL_LANGUAGE_ARGS,
                            encode_args: tuple[str, ...] = (), name: str = "el",
                            router_args: tuple[str, ...] = ("--decode-policy", "round_robin"),
                            ) -> tuple[Server, Server, list[Server]]:
    """(router, encode, languages): one encode server and ``languages`` language servers (the
    router's decode workers, ``router_args`` with more than one) behind the router: the split
    for a model whose language side needs more than its vision side."""
    bootstrap_port = free_port()
    enc_spec, lang_spec = encode_language_specs(model_path, bootstrap_port, *extra,
                                                language_args=language_args, encode_args=encode_args,
                                                language_module=language_module, name=name)
    lang_specs = [lang_spec] if languages == 1 else [
        replace(lang_spec, name=f"{lang_spec.name}-{i}") for i in range(languages)]
    servers = [launch(spec, log_dir, wait=False) for spec in (enc_spec, *lang_specs)]
    try:
        for server in servers:
            server.wait_ready()
        router = launch_router([(servers[0], bootstrap_port)], servers[1:], log_dir,
                               *(router_args if languages > 1 else ()))
    except BaseException:  # interrupted or failed start: no server left behind
        for server in servers:
            server.stop()
        raise
    return router, servers[0], servers[1:]


# Router settings of the two-encoder deployment: a dead encoder is dropped after two failed
# one-second health checks; the breaker opens after 2 failures (so a 4xx counted as a failure
# would show), retries are on (so a retried 4xx would show) but back off briefly.
EL_FAULT_ROUTER_ARGS = ("--prefill-policy", "round_robin", "--decode-policy", "round_robin",
                        "--health-check-interval-secs", "1", "--health-failure-threshold", "2",
                        "--health-success-threshold", "1", "--health-check-timeout-secs", "2",
                        "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "30",
                        "--retry-max-retries", "2", "--retry-initial-backoff-ms", "10",
                        "--request-timeout-secs", "120")


def launch_two_encoders_language(model_path: str | Path, log_dir: Path, *extra: str,
                                 name: str = "el2", buffer_args: tuple[str, ...] = EL_BUFFER_ARGS,
                                 language_args: tuple[str, ...] = EL_LANGUAGE_ARGS,
                                 router_args: tuple[str, ...] = EL_FAULT_ROUTER_ARGS,
                                 retries: bool = True, decode_log_interval: int | None = 1,
                                 **encode_kwargs) -> tuple[Server, Server, Server, Server]:
    """(router, encode A, encode B, language): two encode servers (each its own bootstrap
    port) and one language server behind the router with ``router_args`` (default
    ``EL_FAULT_ROUTER_ARGS``, retries on); ``buffer_args`` and ``encode_kwargs``
    (``encode_args``, ``encode_module``, ``encode_env``) as in ``encode_language_specs``."""
    ports = [free_port(), free_port()]
    if decode_log_interval is not None:
        # --decode-log-interval 1: the running-requests gauge follows every decode step
        language_args = (*language_args, "--decode-log-interval", str(decode_log_interval))
    specs = [encode_language_specs(model_path, p, *extra, language_args=language_args,
                                   name=f"{name}-{tag}", buffer_args=buffer_args, **encode_kwargs)
             for p, tag in zip(ports, "ab")]
    servers = [launch(specs[0][0], log_dir, wait=False), launch(specs[1][0], log_dir, wait=False),
               launch(specs[0][1], log_dir, wait=False)]
    try:
        for server in servers:
            server.wait_ready()
        router = launch_router(list(zip(servers[:2], ports)), [servers[2]], log_dir,
                               *router_args, name=f"{name}-router", retries=retries)
    except Exception:
        for server in servers:
            server.stop()
        raise
    return (router, *servers)


# The vision tower of a production-size model takes time; the tiny one's does not. 30 ms per
# placeholder token (~50 s of vision tower per encoder for the 64-request burst) makes requests
# queue on the encoders as large images do on a real deployment (epd_testbed.slow_vit_server).
PRODUCTION_VIT_SECONDS_PER_TOKEN = 0.03


def launch_production(model_path: str | Path, log_dir: Path,
                      name: str = "el-prod") -> tuple[Server, Server, Server, Server]:
    """(router, encode A, encode B, language) at production defaults (``EL_PRODUCTION_ARGS``;
    the language side's chunked-prefill size is SGLang's default too): the same topology and
    router settings as ``launch_two_encoders_language``, for the tests of bursts and encoder
    crashes that the small pool hides (issue 16). The encode servers' vision tower is paced
    like a production one (``PRODUCTION_VIT_SECONDS_PER_TOKEN``); while the file
    ``extra["vit_pause_file"]`` of an encoder exists (none at launch), its vision-tower calls
    do not return (``epd_testbed.slow_vit_server``)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pause_file = log_dir / f"{name}-vit-pause-{uuid.uuid4().hex[:8]}"
    group = launch_two_encoders_language(
        model_path, log_dir, name=name, buffer_args=EL_PRODUCTION_ARGS, language_args=(),
        encode_module="epd_testbed.slow_vit_server",
        encode_env=(("EPD_VIT_SECONDS_PER_TOKEN", str(PRODUCTION_VIT_SECONDS_PER_TOKEN)),
                    ("EPD_VIT_PAUSE_FILE", str(pause_file))))
    for encoder in group[1:3]:
        encoder.extra["vit_pause_file"] = pause_file
    return group


def launch_mooncake_master(log_dir: Path, name: str = "mooncake-master") -> Server:
    """The Mooncake Store's master (``mooncake_master``, shipped in the Mooncake wheel) on
    loopback: its RPC address is ``extra["rpc"]``, the returned server's port is its HTTP
    metrics port (``master_key_count`` etc.)."""
    import mooncake

    binary = Path(mooncake.__file__).parent / "mooncake_master"
    rpc_port, metrics_port = free_port(), free_port()
    cmd = [str(binary), "--rpc_address=127.0.0.1", f"--rpc_port={rpc_port}",
           "--metrics_host=127.0.0.1", f"--metrics_port={metrics_port}"]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{rpc_port}.log"
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                stdin=subprocess.DEVNULL)
    master = Server(ServerSpec("mooncake_master", tuple(cmd), name=name), metrics_port, proc,
                    log_path, time.time(), extra={"rpc": f"127.0.0.1:{rpc_port}"})
    deadline = time.time() + 60
    while mooncake_key_count(master) is None:
        if not master.alive() or time.time() > deadline:
            master.stop()
            raise ServerError(f"{name} not ready:\n{master.log_tail()}")
        time.sleep(0.2)
    return master


def mooncake_key_count(master: Server) -> int | None:
    """Objects the Mooncake master holds (its ``master_key_count``); None if it does not answer."""
    try:
        with urllib.request.urlopen(master.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None
    for line in text.splitlines():
        if line.startswith("master_key_count "):
            return int(float(line.split()[1]))
    return None


def mooncake_store_env(master: Server, segment_bytes: int = 64 << 20) -> tuple[tuple[str, str], ...]:
    """What a Mooncake Store client (upstream's ``MooncakeEmbeddingStore``) needs to reach
    ``master`` over TCP on this host, contributing a ``segment_bytes`` segment."""
    return (("MOONCAKE_MASTER", master.extra["rpc"]), ("MOONCAKE_PROTOCOL", "tcp"),
            ("MOONCAKE_LOCAL_HOSTNAME", "127.0.0.1"),
            ("MOONCAKE_GLOBAL_SEGMENT_SIZE", str(segment_bytes)))


def launch_global_cache(model_path: str | Path, log_dir: Path, *extra: str, name: str = "el-gc",
                        cache_mb: int = 16,
                        **kwargs) -> tuple[Server, Server, Server, Server, Server]:
    """(router, encode A, encode B, language, mooncake_master): the two-encoder deployment
    (``launch_two_encoders_language``, ``extra`` and ``kwargs`` passed on) whose encoders share
    rows through upstream's ``--enable-mm-global-cache`` (Mooncake Store backend), each with a
    ``cache_mb`` local pool (``SGLANG_VLM_CACHE_SIZE_MB``)."""
    master = launch_mooncake_master(log_dir, name=f"{name}-mooncake-master")
    try:
        group = launch_two_encoders_language(
            model_path, log_dir, *extra, name=name, encode_args=("--enable-mm-global-cache",),
            encode_env=mooncake_store_env(master) + (("SGLANG_VLM_CACHE_SIZE_MB", str(cache_mb)),),
            **kwargs)
    except Exception:
        master.stop()
        raise
    return (*group, master)


def relaunch(server: Server, log_dir: Path) -> Server:
    """Start ``server``'s configuration again on its HTTP port (its bootstrap port is in its
    arguments): what an operator does after a crash."""
    return launch(server.spec, log_dir, port=server.port)


def stat_cpu_seconds(stat: str) -> float:
    """utime + stime of a ``/proc/.../stat`` line (the fields after the name in brackets)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_group_cpu_seconds(pgids: list[int]) -> dict[int, float]:
    """User + system CPU seconds used so far by each process group in ``pgids`` (a server's
    group: the server and its scheduler and detokenizer children), from ``/proc``."""
    out = dict.fromkeys(pgids, 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            text = stat.read_text()
            pgid = int(text.rsplit(")", 1)[1].split()[2])
            if pgid in out:
                out[pgid] += stat_cpu_seconds(text)
    return out


def encode_language_metrics(server: Server) -> dict[str, float]:
    """A server's ``sglang:encode_language_*`` samples from its Prometheus endpoint, keyed
    ``"blocks.free"``, ``"blocks.in_use"``, ``"blocks.total"``, ``"requests.success"``,
    ``"requests.local"``, ``"requests.failed"``, ``"bytes"``."""
    prefix = "sglang:encode_language_"
    samples: dict[str, float] = {}
    for sample, labels, value in prometheus_samples(server.url + "/metrics"):
        if not sample.startswith(prefix):
            continue
        name = sample[len(prefix):].removesuffix("_total")
        label = dict(kv.split("=", 1) for kv in labels)
        key = label.get("state") or label.get("outcome")
        samples[f"{name}.{key.strip(chr(34))}" if key else name] = value
    return samples


def metric_sum(server: Server, name: str, **labels: str) -> float:
    """Sum of a server's Prometheus samples named ``name`` whose labels include ``labels``
    (e.g. ``metric_sum(s, "sglang:encode_language_vit_call_tokens_bucket", le="32.0")``)."""
    return samples_sum(prometheus_samples(server.url + "/metrics"), name, **labels)


def prometheus_samples(url: str) -> list[tuple[str, frozenset[str], float]]:
    """Every sample of the Prometheus text at ``url``: (name, its labels as ``key="value"``
    strings, value); read once, summed by ``samples_sum``."""
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    samples = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        head, value = line.rsplit(" ", 1)
        sample, _, rest = head.partition("{")
        samples.append((sample, frozenset(filter(None, rest.rstrip("}").split(","))), float(value)))
    return samples


def samples_sum(samples: list[tuple[str, frozenset[str], float]], name: str, **labels: str) -> float:
    """Sum of the ``samples`` named ``name`` whose labels include ``labels``."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    return sum(value for sample, have, value in samples if sample == name and want <= have)


def encode_language_blocks(server: Server) -> dict[str, int]:
    """``{"free": n, "quarantined": n, "in_use": n, "total": n}`` of a server's multimodal
    transfer buffers."""
    m = encode_language_metrics(server)
    return {k.split(".", 1)[1]: int(v) for k, v in m.items() if k.startswith("blocks.")}


def wait_all_blocks_free(server: Server, timeout: float = 30.0) -> dict[str, int]:
    """Poll until every block is free (the gauge follows the scheduler loop); returns the last
    reading, which the caller asserts on."""
    deadline = time.time() + timeout
    blocks = encode_language_blocks(server)
    while time.time() < deadline and not (
            blocks and blocks.get("in_use") == 0 and blocks.get("quarantined") == 0):
        time.sleep(0.5)
        blocks = encode_language_blocks(server)
    return blocks


def generate(server: Server, prompt: str, images: list[str] | None = None, max_new_tokens: int = 16,
             ignore_eos: bool = False, timeout: float = 300) -> dict:
    """Greedy /generate of a rendered prompt; images are paths or data URLs."""
    payload: dict = {"text": prompt, "sampling_params": {
        "temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos}}
    if images:
        payload["image_data"] = list(images)
    return server.post("/generate", payload, timeout=timeout)
