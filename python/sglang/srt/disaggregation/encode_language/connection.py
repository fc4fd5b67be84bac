"""What both sides of the encode -> language connection share.

* ``ConnectionConfig``: timeouts and reservation sizes with documented defaults.
* ``ControlChannel``: one ZMQ PULL socket per manager (its endpoint is the manager id) plus a
  PUSH socket per peer, guarded by a lock, never blocking: control messages are the typed
  structures of ``manifest.py``; a malformed or unknown one is logged, counted and dropped.
* ``ManagerBase``: a ``BaseKVManager`` that owns the buffers, the block allocator and one control
  thread, and uses this process's one Mooncake engine (upstream's shared
  ``MooncakeTransferEngine``, see ``make_transfer_engine``). The control thread handles every
  message and every timer (timeouts, heartbeat); an exception while handling one message fails at
  most the request it concerns, never the thread.
* Addressing: ``ConnectionConfig.resolve_addresses`` (advertised vs bind address); the encode
  side's control socket listens on the bootstrap port (docs/transport.md, "Deploying across
  nodes / addressing").

The encode side lives in ``sender.py``, the language side in ``receiver.py``; docs/transport.md
describes the state machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import zmq

from sglang.srt.disaggregation.base.conn import BaseKVManager, KVPoll
from sglang.srt.disaggregation.encode_language.allocator import BlockAllocator
from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    MultimodalDataBuffers,
)
from sglang.srt.disaggregation.encode_language.manifest import (
    Message,
    Ping,
    Pong,
    ProtocolError,
    decode_message,
    encode_message,
    make,
)
from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
    MooncakeTransferEngine,
    init_mooncake_transfer_engine,
)
from sglang.srt.utils.network import NetworkAddress, get_local_ip_auto, zmq_connect

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ConnectionConfig:
    """Transport settings. Defaults are meant for serving; tests shrink them."""

    # Addressing (docs/transport.md, "Deploying across nodes").
    # The encode side's control socket listens on this port: --disaggregation-bootstrap-port, the
    # port the router hands to the language side with each request. 0 = any free port. Language
    # managers always listen on a free port (they tell the encoder their endpoint).
    bootstrap_port: int = 0
    # The address peers reach this process's control socket and transfer engine at. None =
    # upstream's local-IP discovery (get_local_ip_auto: $SGLANG_HOST_IP / $HOST_IP, then the NIC in
    # $SGLANG_LOCAL_IP_NIC, then the source address of the default route). Not --host (HTTP bind).
    advertise_host: Optional[str] = None
    # The address the control socket binds. None = the advertised address; "0.0.0.0" or "::" =
    # every interface (e.g. behind NAT, where the advertised address is not one of this host's).
    bind_host: Optional[str] = None
    # Transfer engine, when this process has none yet (otherwise SGLang's shared one is used):
    # GPU id and --disaggregation-ib-device (a device, a list, or a per-GPU JSON mapping).
    gpu_id: int = 0
    ib_device: Optional[str] = None
    # Language side: tokens reserved when a request arrives, and per resume round
    # (None = the same as default_reserve_tokens, so a resume always reuses its own blocks).
    default_reserve_tokens: int = 2048
    resume_tokens: Optional[int] = None
    # Timeouts (seconds).
    bootstrap_timeout_s: float = 30.0  # peer registered + every destination reserved
    waiting_timeout_s: float = 300.0  # language: reserved -> first round arrives
    # language: a further round requested -> it arrives
    transfer_timeout_s: float = 60.0
    # encoder: partial round -> all destinations ask for more;
    # language: waiting for resume blocks
    resume_timeout_s: float = 60.0
    # language: abort sent -> encoder confirms no write in flight
    abort_ack_timeout_s: float = 30.0
    heartbeat_interval_s: float = 2.0
    heartbeat_max_failures: int = 3  # missed pongs in a row = peer dead
    num_transfer_workers: int = 2  # encode side
    tick_s: float = 0.02  # control-thread poll period

    @classmethod
    def from_server_args(cls, server_args, *, gpu_id: int = 0) -> "ConnectionConfig":
        """``--disaggregation-mm-reserve-tokens``, ``--disaggregation-bootstrap-port``,
        ``--disaggregation-ib-device`` (else ``--mooncake-ib-device``, as upstream's engine) and this
        rank's ``gpu_id``, then the JSON ``--disaggregation-mm-transfer-config`` overrides; an
        unknown key is an error naming the valid ones."""
        overrides = json.loads(server_args.disaggregation_mm_transfer_config or "{}")
        if not isinstance(overrides, dict):
            raise ValueError(
                "--disaggregation-mm-transfer-config must be a JSON object"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(
                f"unknown transfer setting(s) {unknown}; valid: {sorted(names)}"
            )
        overrides.setdefault(
            "default_reserve_tokens", server_args.disaggregation_mm_reserve_tokens
        )
        overrides.setdefault(
            "bootstrap_port", server_args.disaggregation_bootstrap_port
        )
        overrides.setdefault(
            "ib_device",
            server_args.disaggregation_ib_device or server_args.mooncake_ib_device,
        )
        overrides.setdefault("gpu_id", gpu_id)
        return cls(**overrides)

    def resolve_addresses(self) -> Tuple[str, str]:
        """(advertised host, bind host). The advertised host must be routable: a wildcard is an
        error, a failed discovery is an error that names the override."""
        advertise = self.advertise_host
        if not advertise:
            try:
                advertise = get_local_ip_auto()
            except ValueError as e:
                raise ValueError(
                    "cannot discover a routable address of this host; set advertise_host in "
                    "--disaggregation-mm-transfer-config or SGLANG_HOST_IP"
                ) from e
        if advertise.strip("[]") in _WILDCARDS:
            raise ValueError(
                f"advertise_host {advertise!r} is a wildcard, not an address peers can reach; "
                "set bind_host to bind every interface and advertise_host to this host's address"
            )
        # Manager ids compare as strings: spell the host as an IP, as peer_endpoint does.
        advertise = NetworkAddress.resolve_host(advertise.strip("[]"))
        return advertise, self.bind_host or advertise


_WILDCARDS = ("0.0.0.0", "::", "*")


def peer_endpoint(addr: str) -> str:
    """A peer's control endpoint ``host:port`` spelled as its manager id is: the host resolved to
    an IP (the router hands out the encode server's hostname with ``bootstrap_host``).
    """
    return NetworkAddress.parse(addr).resolved().to_host_port_str()


class TransferError(RuntimeError):
    """A request failed; ``reason`` says why."""

    def __init__(self, room: int, reason: str):
        super().__init__(f"bootstrap room {room}: {reason}")
        self.room = room
        self.reason = reason


class RoomInUseError(RuntimeError):
    pass


class ControlChannel:
    """Typed control messages over ZMQ PUSH/PULL. The PULL socket binds ``bind_host:port``; its
    ``endpoint`` (the manager id peers send to) names ``advertise_host`` and the bound port, so a
    socket bound to every interface still has an id peers can reach."""

    def __init__(self, bind_host: str, port: int, advertise_host: str):
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        bind = NetworkAddress(bind_host, port)
        if bind.is_ipv6:
            self.pull.setsockopt(zmq.IPV6, 1)
        try:
            self.pull.bind(bind.to_tcp())  # port 0: an ephemeral port
        except zmq.ZMQError as e:
            self.pull.close()
            self.ctx.term()
            raise OSError(
                e.errno,
                f"cannot bind the control socket to {bind} ({e.strerror}): the port must be free "
                "and the bind address one of this host's (set bind_host to 0.0.0.0 when the "
                "advertised address is translated, e.g. NAT)",
            ) from e
        bound = self.pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        port = NetworkAddress.parse(bound[len("tcp://") :]).port
        self.endpoint = NetworkAddress(advertise_host, port).to_host_port_str()
        self._push: Dict[str, zmq.Socket] = {}
        self._lock = threading.Lock()
        self.rejected = 0  # malformed / unknown messages dropped

    def send(self, endpoint: str, msg) -> bool:
        data = encode_message(msg)
        with self._lock:
            sock = self._push.get(endpoint)
            if sock is None:
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 10000)
                _connect(sock, endpoint)
                self._push[endpoint] = sock
            try:
                sock.send(data, zmq.NOBLOCK)
                return True
            except zmq.Again:
                logger.warning(
                    "control queue to %s is full; dropped %s",
                    endpoint,
                    type(msg).__name__,
                )
                return False

    def send_raw(self, endpoint: str, data: bytes) -> None:
        """For tests of garbage handling only."""
        with self._lock:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            _connect(sock, endpoint)
            sock.send(data)
            sock.close()

    def recv(self, timeout_s: float) -> Optional[Message]:
        """One decoded message, or None on timeout or a rejected message."""
        if not self.pull.poll(int(timeout_s * 1000)):
            return None
        data = self.pull.recv()
        try:
            return decode_message(data)
        except ProtocolError as e:
            self.rejected += 1
            logger.warning("rejected control message (%d bytes): %s", len(data), e)
            return None

    def close(self) -> None:
        with self._lock:
            for s in self._push.values():
                s.close()
            self._push.clear()
            self.pull.close()
        self.ctx.term()


def _connect(sock: zmq.Socket, endpoint: str) -> None:
    """Connect to a peer's ``host:port`` (IPv6 bracketed), through upstream's ``zmq_connect`` so
    ``SGLANG_ZMQ_SOURCE_IP`` pins the source address as for every other SGLang socket.
    """
    addr = NetworkAddress.parse(endpoint)
    if addr.is_ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    zmq_connect(sock, addr.to_tcp())


@dataclasses.dataclass
class PeerHealth:
    """Heartbeat bookkeeping for one peer."""

    endpoint: str
    missed: int = 0
    outstanding: Optional[int] = None  # nonce of the unanswered ping
    next_ping: float = 0.0
    dead: bool = False


def make_transfer_engine(
    hostname: str, gpu_id: int = 0, ib_device: Optional[str] = None
) -> MooncakeTransferEngine:
    """This process's one Mooncake engine, shared with the rest of SGLang (PD KV transfer, HiCache,
    upstream's encoder disaggregation): upstream's ``init_mooncake_transfer_engine`` returns the
    engine SGLang already made, or makes it on ``hostname`` with this GPU and IB device (protocol
    from MOONCAKE_PROTOCOL / MC_FORCE_TCP, P2P handshake)."""
    engine = init_mooncake_transfer_engine(
        hostname=hostname, gpu_id=gpu_id, ib_device=ib_device
    )
    if engine.hostname != hostname:
        logger.info(
            "using this process's Mooncake engine at %s (made by SGLang; its address follows "
            "SGLANG_HOST_IP); the control socket advertises %s",
            engine.get_session_id(),
            hostname,
        )
    return engine


class ManagerBase(BaseKVManager):
    """Buffers + allocator + engine + control thread. Subclasses handle messages and timers."""

    role = "base"

    def __init__(
        self,
        buffer_config: MultimodalBufferConfig,
        config: Optional[ConnectionConfig] = None,
        engine=None,
    ):
        # BaseKVManager.__init__ is abstract with KV-cache arguments; nothing to call.
        self.config = config or ConnectionConfig()
        self.buffers = MultimodalDataBuffers(buffer_config)
        self.layout = self.buffers.layout
        self.allocator = BlockAllocator(
            self.layout.num_blocks, name=f"{self.role} blocks"
        )
        advertise, bind = self.config.resolve_addresses()
        # Bind first: a wrong address or a taken bootstrap port fails before the engine starts.
        self.channel = ControlChannel(bind, self._control_port(), advertise)
        # advertise_host:port, whatever the bind address
        self.manager_id = self.channel.endpoint
        try:
            if engine is None:
                engine = make_transfer_engine(
                    advertise, self.config.gpu_id, self.config.ib_device
                )
            self.engine = engine
            self.session_id = self.engine.get_session_id()
            self.buffers.register(self.engine)
        except BaseException:
            self.channel.close()
            raise
        self.lock = threading.RLock()
        self.health: Dict[str, PeerHealth] = {}
        self._nonce = itertools.count(1)
        self._closed = threading.Event()
        # exceptions caught in handlers (each failed one request at most)
        self.thread_errors = 0
        self._thread = threading.Thread(
            target=self._control_loop, name=f"el-{self.role}-control", daemon=True
        )
        self._thread.start()

    def _control_port(self) -> int:
        """Port of this side's control socket: any free one (the manager id tells peers)."""
        return 0

    # BaseKVManager --------------------------------------------------------------------------
    def register_to_bootstrap(self):
        """The control endpoint is the bootstrap address; nothing else to register."""
        return self.manager_id

    @property
    def bootstrap_addr(self) -> str:
        return self.manager_id

    # Control thread -------------------------------------------------------------------------
    def _control_loop(self) -> None:
        while not self._closed.is_set():
            try:
                msg = self.channel.recv(self.config.tick_s)
                if msg is not None:
                    self._dispatch(msg)
                self._tick(time.monotonic())
            except zmq.ContextTerminated:
                return
            except Exception:
                if self._closed.is_set():
                    return
                self.thread_errors += 1
                logger.exception(
                    "%s control thread: error handling a message or timer", self.role
                )

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Ping):
            self.channel.send(
                msg.manager_id,
                make(Pong, manager_id=self.manager_id, nonce=self._pong_nonce(msg)),
            )
        elif isinstance(msg, Pong):
            with self.lock:
                h = self.health.get(msg.manager_id)
                if h is not None and h.outstanding is not None:
                    h.outstanding = None
                    h.missed = 0
            self._on_pong(msg)
        else:
            self._handle(msg)

    def _pong_nonce(self, ping: Ping) -> int:
        return ping.nonce

    def _on_pong(self, msg: Pong) -> None:
        pass

    def _handle(self, msg: Message) -> None:
        raise NotImplementedError

    def _tick(self, now: float) -> None:
        self._heartbeat(now)

    def _active_peers(self) -> List[str]:
        """Peers with at least one live request; only those are pinged."""
        raise NotImplementedError

    def _heartbeat(self, now: float) -> None:
        cfg = self.config
        peers = set(self._active_peers())
        dead: List[str] = []
        with self.lock:
            for ep in list(self.health):
                if ep not in peers and not self.health[ep].dead:
                    del self.health[ep]
            for ep in peers:
                h = self.health.setdefault(
                    ep, PeerHealth(ep, next_ping=now + cfg.heartbeat_interval_s)
                )
                if h.dead or now < h.next_ping:
                    continue
                if h.outstanding is not None:
                    h.missed += 1
                    if h.missed >= cfg.heartbeat_max_failures:
                        h.dead = True
                        dead.append(ep)
                        continue
                h.outstanding = next(self._nonce)
                h.next_ping = now + cfg.heartbeat_interval_s
                self.channel.send(
                    ep, make(Ping, manager_id=self.manager_id, nonce=h.outstanding)
                )
        for ep in dead:
            logger.error(
                "%s: peer %s missed %d heartbeats; failing its requests",
                self.role,
                ep,
                cfg.heartbeat_max_failures,
            )
            self._on_peer_dead(
                ep,
                f"peer {ep} is unreachable (missed {cfg.heartbeat_max_failures} heartbeats): "
                f"it is down, cannot reach this side's advertised address {self.manager_id}, or "
                f"answers under another address than {ep}",
            )

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        raise NotImplementedError

    def peer_is_dead(self, endpoint: str) -> bool:
        with self.lock:
            h = self.health.get(endpoint)
            return bool(h and h.dead)

    def revive_peer(self, endpoint: str) -> None:
        """Forget that a peer was declared dead (e.g. it restarted on the same address)."""
        with self.lock:
            self.health.pop(endpoint, None)

    # Lifecycle ------------------------------------------------------------------------------
    def wait_until(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.01)
        return pred()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=5)
        self._close_workers()
        self.channel.close()
        self.buffers.deregister()

    def _close_workers(self) -> None:
        pass


__all__ = [
    "ConnectionConfig",
    "ControlChannel",
    "KVPoll",
    "ManagerBase",
    "RoomInUseError",
    "make_transfer_engine",
    "peer_endpoint",
    "TransferError",
]
