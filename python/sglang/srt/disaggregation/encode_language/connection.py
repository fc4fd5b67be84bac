"""What both sides of the encode -> language connection share.

* ``ConnectionConfig``: timeouts and reservation sizes with documented defaults.
* ``ControlChannel``: one ZMQ PULL socket per manager (its endpoint is the manager id) plus a
  PUSH socket per peer, guarded by a lock, never blocking: control messages are the typed
  structures of ``manifest.py``; a malformed or unknown one is logged, counted and dropped.
* ``ManagerBase``: owns the buffers, the block allocator and one control thread, and uses this
  process's one Mooncake engine (upstream's shared ``MooncakeTransferEngine``, see
  ``make_transfer_engine``). The control thread handles every message and every timer (timeouts,
  heartbeat, fences, pruning); an exception while handling one message fails at most the request
  it concerns, never the thread. It is event driven: it blocks in the ZMQ poller until a message
  arrives, a local thread calls ``wake()`` (a new request, an abort, a finished round, freed
  blocks), or the next timer is due (``_tick`` returns that deadline). No fixed tick.
* Addressing: ``ConnectionConfig.resolve_addresses`` (advertised vs bind address). The encode
  side's control socket listens on ``--host``:``--disaggregation-bootstrap-port``, where the
  router's ``--prefill`` URL sends the language side, as upstream's PD bootstrap server; its
  manager id names the advertised address. A peer may reach a manager at another address than
  the one it advertises: the language side learns the encoder's id from its ``RegisterAck`` and
  names the encoder by the endpoint it dials (``ManagerBase.reached_at``; docs/transport.md,
  "Deploying across nodes / addressing").
* Liveness: peers with live requests are pinged every ``heartbeat_interval_s``; one that misses
  ``heartbeat_max_failures`` pongs in a row (the liveness window,
  ``ConnectionConfig.liveness_window_s``) is declared dead (its requests fail) but is still
  pinged, and a pong revives it. A ping this side sent late (it was not running itself) is not
  counted as missed. A peer dead, or without a live request, for ``peer_prune_s`` is
  forgotten: health entry, registration and PUSH socket.
* ``TransferRequest``: the small protocol the per-request objects (``EncodeSender``,
  ``LanguageReceiver``) implement for a scheduler loop. They do not subclass upstream's
  ``BaseKVSender``/``BaseKVReceiver``: those constructors take KV arguments and ``send`` takes KV
  indices, which a multimodal payload transport does not have.

The encode side lives in ``sender.py``, the language side in ``receiver.py``; docs/transport.md
describes the state machine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import ipaddress
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import msgspec
import zmq

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.allocator import BlockAllocator
from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    MultimodalDataBuffers,
)
from sglang.srt.disaggregation.encode_language.manifest import (
    FaultKind,
    Message,
    Ping,
    Pong,
    ProtocolError,
    RegisterAck,
    decode_message,
    encode_message,
    make,
)
from sglang.srt.distributed.device_communicators.mooncake_transfer_engine import (
    MooncakeTransferEngine,
    init_mooncake_transfer_engine,
)
from sglang.srt.environ import envs
from sglang.srt.utils.network import NetworkAddress, get_local_ip_auto, zmq_connect

logger = logging.getLogger(__name__)


def mooncake_timeout_s(nbytes: int) -> float:
    """How long Mooncake's ``batch_transfer_sync`` lets one batch of ``nbytes`` run before it
    returns -1: ``MC_TRANSFER_TIMEOUT`` whole seconds (at least 5; 30 when unset) plus one
    nanosecond per byte, read as Mooncake reads it (``TransferEnginePy``)."""
    env = os.environ.get("MC_TRANSFER_TIMEOUT")
    seconds = 30 if env is None else max(5, _atoi(env))
    return seconds + nbytes * 1e-9


# A write in flight is polled every WRITE_POLL_PAUSE_S for its first WRITE_POLL_FAST_S (a small
# write's status is read at most one pause late), then after pauses doubling up to
# WRITE_POLL_MAX_S (a slow or stalled one costs a few wake-ups a second).
WRITE_POLL_PAUSE_S = 50e-6
WRITE_POLL_FAST_S = 2e-3
WRITE_POLL_MAX_S = 1e-3


def write_segments(
    engine: MooncakeTransferEngine,
    session_id: str,
    srcs: List[int],
    dsts: List[int],
    lens: List[int],
) -> int:
    """Write ``lens[i]`` bytes from ``srcs[i]`` to the peer's ``dsts[i]``: 0 once every segment
    landed, -1 as soon as one failed or once Mooncake's timeout for the batch passed
    (``mooncake_timeout_s``); after a -1, segments still in flight may land later. This is the
    contract of upstream's ``batch_transfer_sync``.

    Not ``batch_transfer_sync`` itself: it waits by spinning on the batch's status without a
    pause, so a writer holds a core for as long as the transfer runs, and over TCP the transfer
    needs a core on both hosts' transport threads (on the CPU test bed, the language server's).
    Each segment is submitted on its own (``transfer_submit_write``) and polled
    (``transfer_check_status``) with a pause between polls (``WRITE_POLL_*``). A segment the
    engine refuses to submit (e.g. a stale handle to a restarted peer) goes through
    ``batch_transfer_sync`` with the rest, whose failure path drops such a handle.
    """
    raw = engine.engine
    deadline = time.monotonic() + mooncake_timeout_s(sum(lens))
    pending = []
    for i, (src, dst, n) in enumerate(zip(srcs, dsts, lens)):
        batch_id = raw.transfer_submit_write(session_id, src, dst, n)
        # 0: not submitted (Mooncake < 0.3.12 answered -1 as an unsigned 64-bit id)
        if batch_id in (0, (1 << 64) - 1):
            if engine.batch_transfer_sync(session_id, srcs[i:], dsts[i:], lens[i:]) < 0:
                return -1
            break
        pending.append(batch_id)
    fast_until, pause = time.monotonic() + WRITE_POLL_FAST_S, WRITE_POLL_PAUSE_S
    while pending:
        # 1: landed, 0: in flight, -1: failed (both free the batch id), -2: a slice timed out
        states = [raw.transfer_check_status(batch_id) for batch_id in pending]
        if any(state < 0 for state in states):
            return -1
        pending = [b for b, state in zip(pending, states) if state == 0]
        if not pending:
            break
        now = time.monotonic()
        if now > deadline:
            return -1
        if now > fast_until:
            pause = min(2 * pause, WRITE_POLL_MAX_S)
        time.sleep(pause)
    return 0


def _atoi(text: str) -> int:
    """C's ``atoi``: the leading integer of ``text``, 0 when there is none."""
    digits = text.strip()
    sign = -1 if digits[:1] == "-" else 1
    digits = digits[1:] if digits[:1] in "+-" else digits
    n = len(digits) - len(digits.lstrip("0123456789"))
    return sign * int(digits[:n]) if n else 0


@dataclasses.dataclass
class ConnectionConfig:
    """Transport settings. Defaults are meant for serving; tests shrink them."""

    # Addressing (docs/transport.md, "Deploying across nodes").
    # The encode side's control socket listens on this port: --disaggregation-bootstrap-port, the
    # port the router hands to the language side with each request. 0 = any free port. Language
    # managers always listen on a free port (they tell the encoder their endpoint).
    bootstrap_port: int = 0
    # The address this manager names itself by (its manager id) and its transfer engine's. None =
    # upstream's local-IP discovery (get_local_ip_auto: $SGLANG_HOST_IP / $HOST_IP, then the NIC in
    # $SGLANG_LOCAL_IP_NIC, then the source address of the default route). The encoder's peers
    # dial it where the router sends them, not here; the language side must be reachable here.
    advertise_host: Optional[str] = None
    # The address the control socket binds. None = the advertised address; "0.0.0.0" or "::" =
    # every interface (e.g. behind NAT, where the advertised address is not one of this host's).
    # From the server arguments the encode side binds --host (from_server_args).
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
    bootstrap_timeout_s: float = 30.0  # registered + the request expected and announced
    waiting_timeout_s: float = 300.0  # language: reserved -> first round arrives
    # Encoder: a round waits this long for staging blocks. Language: a further round requested
    # -> it arrives, within round_timeout_s (this, plus the encoder's write deadline, plus
    # transfer_grace_s), so the encoder's own verdict on a slow write always comes first.
    transfer_timeout_s: float = 60.0
    # encoder: partial round -> the destination asks for more;
    # language: waiting for resume blocks
    resume_timeout_s: float = 60.0
    # language: abort sent -> encoder confirms no write in flight
    abort_ack_timeout_s: float = 30.0
    # Liveness (docs/transport.md, "Liveness"): a watched peer is pinged every
    # heartbeat_interval_s and declared dead once a ping has gone unanswered for the liveness
    # window, heartbeat_interval_s x heartbeat_max_failures (10 s by default). Defaults as
    # upstream PD's (SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL, at least 2 s, and
    # SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE, at least 1; common/conn.py), read from the
    # same environment variables.
    heartbeat_interval_s: float = dataclasses.field(
        default_factory=lambda: max(
            envs.SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL.get(), 2.0
        )
    )
    heartbeat_max_failures: int = dataclasses.field(
        default_factory=lambda: max(
            envs.SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE.get(), 1
        )
    )
    num_transfer_workers: int = 2  # encode side
    # Encoder: one transfer-engine write (one round) may take this long;
    # past it the room fails and the destination is told a write may still land.
    data_write_timeout_s: float = 30.0
    # Language: how much longer than the encoder's own bound for a round it waits for the round
    # (round_timeout_s): the encoder's Abort or RoundDone is on its way meanwhile.
    transfer_grace_s: float = 5.0
    # Language: blocks a peer may still write (declared dead, or its write timed out) stay
    # quarantined until its abort_ack or this long, whichever comes first (logged when it fires).
    fence_timeout_s: float = 120.0
    # Both: a peer dead, or without a live request, this long is forgotten.
    peer_prune_s: float = 300.0
    # Encoder: payload bytes held by reference until their last round; send() past the bound
    # raises PayloadBudgetError and changes nothing (0 = unbounded).
    max_inflight_payload_bytes: int = 8 << 30

    @property
    def liveness_window_s(self) -> float:
        """The liveness window: a peer silent (a ping unanswered) this long is declared dead
        and its requests fail (503); a pause shorter than this (a GC pause, SIGSTOP, a noisy
        neighbour) loses no request. The verdict comes this long after the first ping the
        peer left unanswered, so at most one ``heartbeat_interval_s`` later than this after
        it went silent."""
        return self.heartbeat_interval_s * self.heartbeat_max_failures

    def write_deadline_s(self, num_blocks: int, block_bytes: int) -> float:
        """Encoder: how long the write of one round of ``num_blocks`` blocks (``block_bytes``
        each, every slot counted) may take: Mooncake's own timeout for the batch plus
        ``data_write_timeout_s``. Mooncake therefore always returns its -1 first for a write it
        is timing; this deadline fires only for a write stuck where Mooncake has no timer (e.g.
        its connection handshake)."""
        return mooncake_timeout_s(num_blocks * block_bytes) + self.data_write_timeout_s

    def round_timeout_s(self, num_blocks: int, block_bytes: int) -> float:
        """Language: how long a further round into ``num_blocks`` reserved blocks may take to
        arrive. The encoder's own bound for it (``transfer_timeout_s`` for staging blocks, then
        ``write_deadline_s``) plus ``transfer_grace_s``: the encoder's verdict (its RoundDone,
        or the Abort of a write that failed or timed out) always arrives first, so the language
        side never races it. The rule assumes both sides share these settings and
        ``MC_TRANSFER_TIMEOUT`` (docs/transport.md, "Bounded writes")."""
        return (
            self.transfer_timeout_s
            + self.write_deadline_s(num_blocks, block_bytes)
            + self.transfer_grace_s
        )

    @classmethod
    def from_server_args(cls, server_args, *, gpu_id: int = 0) -> "ConnectionConfig":
        """``--disaggregation-mm-reserve-tokens``, ``--disaggregation-bootstrap-port``,
        ``--disaggregation-ib-device`` (else ``--mooncake-ib-device``, as upstream's engine) and this
        rank's ``gpu_id``, then the JSON ``--disaggregation-mm-transfer-config`` overrides; an
        unknown key is an error naming the valid ones. The encode side's control socket binds
        ``--host``, as upstream's PD bootstrap server (``managers/disagg_service.py``): the
        router's ``--prefill`` URL names the address the language side dials, and the HTTP
        server the router reaches there binds ``--host`` too; a ``bind_host`` override is
        refused there (it could move the socket away from that address)."""
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
        if server_args.disaggregation_mode == "encode":
            if "bind_host" in overrides:
                raise ValueError(
                    "--disaggregation-mode encode: bind_host in --disaggregation-mm-transfer-"
                    "config is not accepted; the control socket binds --host (as upstream's PD "
                    "bootstrap server), the address the router's --prefill URL names. Set "
                    "--host (0.0.0.0 for every interface) instead."
                )
            overrides["bind_host"] = server_args.host
        return cls(**overrides)

    def resolve_addresses(self) -> Tuple[str, str]:
        """(advertised host, bind host), both IPs (the bind host may be a wildcard). The
        advertised host must be routable: a wildcard is an error, a failed discovery is an error
        that names the override; a bind host that does not resolve is an error."""
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
        bind = (self.bind_host or advertise).strip("[]")
        if bind not in _WILDCARDS:
            # the IP the router's URL resolves to when it names this host by the same name
            bind = NetworkAddress.resolve_host(bind)
        return advertise, bind


_WILDCARDS = ("0.0.0.0", "::", "*")


class PeerAddressError(ValueError):
    """A peer address (a request's ``bootstrap_host:bootstrap_port``) that cannot be used.
    ``kind``: ``FaultKind.CLIENT`` when it cannot be parsed or names no host (the request's
    fault: 400); ``FaultKind.UNAVAILABLE`` when the lookup failed for now (the resolver did not
    answer: the same request may work later, 503, which the router counts against the server).
    """

    def __init__(self, message: str, kind: FaultKind = FaultKind.CLIENT) -> None:
        super().__init__(message)
        self.kind = kind


# getaddrinfo answers that the name does not exist or cannot be used as given: the request's
# fault. Any other failure (EAI_AGAIN: the resolver did not answer in time, EAI_FAIL, a
# system error) says nothing about the name and may heal.
_NAME_ERRORS = {
    getattr(socket, name)
    for name in (
        "EAI_NONAME",
        "EAI_NODATA",
        "EAI_ADDRFAMILY",
        "EAI_SERVICE",
        "EAI_FAMILY",
    )
    if hasattr(socket, name)
}


def resolve_endpoint(addr: str) -> str:
    """``host:port`` with the host resolved to an IP (upstream's ``NetworkAddress``), or
    ``PeerAddressError`` with the fault's kind."""
    try:
        return NetworkAddress.parse(addr).resolved().to_host_port_str()
    except ValueError as e:  # parse error, or resolve_host's wrapped gaierror
        cause = e.__cause__
        kind = (
            FaultKind.UNAVAILABLE
            if isinstance(cause, socket.gaierror) and cause.errno not in _NAME_ERRORS
            else FaultKind.CLIENT
        )
        raise PeerAddressError(
            f"bootstrap address {addr!r} cannot be used: {e}", kind
        ) from e
    except OSError as e:  # a resolver that failed otherwise (a timeout, a system error)
        raise PeerAddressError(
            f"bootstrap address {addr!r} cannot be resolved now: {e}",
            FaultKind.UNAVAILABLE,
        ) from e


def _names_a_host(addr: str) -> bool:
    """Whether looking ``addr`` up asks a resolver: a host name, not an IP or an address that
    does not parse."""
    try:
        host = NetworkAddress.parse(addr).host
    except ValueError:
        return False  # refused by the parser
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


class PeerLookups:
    """Name lookups of peer addresses, as their manager ids spell them (the router hands out the
    encode server's hostname with ``bootstrap_host``), kept ``ttl_s`` (a client fault for
    ``failed_ttl_s``: a name that appears heals soon; a failure that may heal is not kept) in
    a bounded table. ``lookup_async`` answers a miss on a worker thread, so the language
    scheduler's thread never waits for a resolver (a slow or failing one would stall every
    request behind it). ``resolve`` and ``clock`` are parameters for tests."""

    def __init__(
        self,
        resolve: Callable[[str], str] = resolve_endpoint,
        clock: Callable[[], float] = time.monotonic,
        ttl_s: float = 60.0,
        failed_ttl_s: float = 5.0,
        max_entries: int = 1024,
        workers: int = 2,
        max_pending: int = 64,
    ) -> None:
        self._resolve, self._clock = resolve, clock
        self.ttl_s = ttl_s
        self.failed_ttl_s = failed_ttl_s
        self.max_entries = max_entries
        self._workers = workers
        # names looked up at once at most; more answer 503 at once (unique names from clients
        # must not queue up in front of the encoder's own name)
        self.max_pending = max_pending
        # addr -> (expires, endpoint or error message, None or the error's kind)
        self._table: "collections.OrderedDict" = collections.OrderedDict()
        self._pending: Dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def cached(self, addr: str) -> Optional[str]:
        """The endpoint of ``addr`` when the table answers it (a kept failure raises its
        ``PeerAddressError``), else None."""
        with self._lock:
            hit = self._table.get(addr)
            if hit is None or hit[0] <= self._clock():
                return None
            self._table.move_to_end(addr)
        _, value, kind = hit
        if kind is not None:
            raise PeerAddressError(value, kind)
        return value

    def lookup(self, addr: str) -> str:
        """The endpoint of ``addr``, looked up on this thread on a miss."""
        value = self.cached(addr)
        if value is not None:
            return value
        now = self._clock()
        try:
            value, kind, ttl = self._resolve(addr), None, self.ttl_s
        except PeerAddressError as e:
            value, kind, ttl = str(e), e.kind, self.failed_ttl_s
            if kind != FaultKind.CLIENT:
                with self._lock:
                    stale = self._table.get(addr)
                if stale is not None and stale[2] is None:
                    # the resolver failed for now: the last good answer serves until it heals
                    return stale[1]
                raise  # may heal: the next request looks again
        with self._lock:
            self._table[addr] = (now + ttl, value, kind)
            self._table.move_to_end(addr)
            while len(self._table) > self.max_entries:
                self._table.popitem(last=False)
        if kind is not None:
            raise PeerAddressError(value, kind)
        return value

    def lookup_async(self, addr: str) -> concurrent.futures.Future:
        """``lookup(addr)`` as a future: done at once when the table answers or no resolver
        is asked (an IP, an address that does not parse), else looked up on a worker thread
        (one lookup per address at a time)."""
        try:
            value = self.cached(addr)
            if value is None and not _names_a_host(addr):
                value = self.lookup(addr)
        except PeerAddressError as e:
            value = e
        if value is not None:
            done = concurrent.futures.Future()
            if isinstance(value, PeerAddressError):
                done.set_exception(value)
            else:
                done.set_result(value)
            return done
        with self._lock:
            future = self._pending.get(addr)
            if future is None and len(self._pending) >= self.max_pending:
                future = concurrent.futures.Future()
                future.set_exception(
                    PeerAddressError(
                        f"bootstrap address {addr!r}: {len(self._pending)} name lookups "
                        "already running",
                        FaultKind.UNAVAILABLE,
                    )
                )
                return future
            started = future is None
            if started:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        self._workers, thread_name_prefix="el-peer-lookup"
                    )
                future = self._executor.submit(self.lookup, addr)
                self._pending[addr] = future
        if started:  # outside the lock: a done future runs the callback here
            future.add_done_callback(lambda f: self._forget_pending(addr, f))
        return future

    def _forget_pending(self, addr: str, future: concurrent.futures.Future) -> None:
        with self._lock:
            if self._pending.get(addr) is future:
                del self._pending[addr]


# This process's lookups (the language scheduler's).
PEER_LOOKUPS = PeerLookups()


def peer_endpoint(addr: str) -> str:
    """A peer's control endpoint ``host:port`` spelled as its manager id is: the host resolved to
    an IP (``PEER_LOOKUPS``). Raises ``PeerAddressError``."""
    return PEER_LOOKUPS.lookup(addr)


class TransferError(RuntimeError):
    """A request failed; ``reason`` says why, ``kind`` (``FaultKind``) what answers it."""

    def __init__(
        self, room: int, reason: str, kind: FaultKind = FaultKind.INTERNAL
    ) -> None:
        super().__init__(f"bootstrap room {room}: {reason}")
        self.room = room
        self.reason = reason
        self.kind = kind


class RoomInUseError(RuntimeError):
    pass


class TransferRequest(Protocol):
    """What a scheduler loop calls on one request's sender or receiver (the subset of upstream's
    ``BaseKVSender``/``BaseKVReceiver`` this transport implements, with the same meaning).
    """

    def poll(self) -> int:
        """A ``KVPoll`` state: Bootstrapping, WaitingForInput, Transferring, Success, Failed."""

    def failure_exception(self) -> None:
        """Raise ``TransferError`` with the reason the request failed."""

    def abort(self) -> None:
        """End the request; a no-op once it succeeded or failed."""

    def clear(self) -> None:
        """Drop what the request still holds after the scheduler is done with it."""


class WakePipe:
    """A wake-up any thread can post without blocking and a poller (``zmq.Poller`` takes raw
    fds) can wait on: a non-blocking pipe whose read end is readable while one is pending.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()  # close() vs wake(): never write a reused fd

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        with self._lock:
            if self._w < 0:
                return  # closed
            try:
                os.write(self._w, b"w")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending already

    def drain(self) -> bool:
        """Consume the pending wake-ups; True if there was one (False once closed)."""
        woken = False
        with self._lock:
            if self._r < 0:
                return False
            try:
                while os.read(self._r, 4096):
                    woken = True
            except BlockingIOError:
                pass
        return woken

    def close(self) -> None:
        with self._lock:
            if self._w < 0:
                return
            os.close(self._r)
            os.close(self._w)
            self._r = self._w = -1


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
                "and the bind address one of this host's (the encode side binds --host; the "
                "language side binds bind_host, else its advertised address: set bind_host to "
                "0.0.0.0 when that address is translated, e.g. NAT)",
            ) from e
        bound = self.pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        port = NetworkAddress.parse(bound[len("tcp://") :]).port
        self.endpoint = NetworkAddress(advertise_host, port).to_host_port_str()
        self.listening = NetworkAddress(bind_host, port).to_host_port_str()
        self._push: Dict[str, zmq.Socket] = {}
        self._lock = threading.Lock()
        self.rejected = 0  # malformed / unknown messages dropped
        self._wakeups = WakePipe()  # local wake-ups of wait()
        self._poller = zmq.Poller()
        self._poller.register(self.pull, zmq.POLLIN)
        self._poller.register(self._wakeups.fileno(), zmq.POLLIN)

    def send(self, endpoint: str, msg) -> bool:
        data = encode_message(msg)
        with self._lock:
            sock = self._push.get(endpoint)
            if sock is None:
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 10000)
                try:
                    _connect(sock, endpoint)
                except BaseException:
                    sock.close()  # else it keeps the context from terminating
                    raise
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

    def close_peer(self, endpoint: str) -> None:
        """Close the PUSH socket to a peer that went away (a later send reconnects)."""
        with self._lock:
            sock = self._push.pop(endpoint, None)
            if sock is not None:
                sock.close()

    def wake(self) -> None:
        """Make a blocked ``wait`` return now (any thread; never blocks)."""
        self._wakeups.wake()

    def wait(self, timeout_s: Optional[float]) -> bool:
        """Block until a message is readable, ``wake()`` was called, or ``timeout_s`` passed
        (None = no timeout). Returns True when woken by ``wake()``."""
        ms = None if timeout_s is None else max(0, math.ceil(timeout_s * 1000))
        events = dict(self._poller.poll(ms))
        return self._wakeups.fileno() in events and self._wakeups.drain()

    def recv_nowait(self) -> Optional[Message]:
        """One decoded message if one is queued; None when none is, or it was rejected."""
        try:
            data = self.pull.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        try:
            return decode_message(data)
        except ProtocolError as e:
            self.rejected += 1
            logger.warning("rejected control message (%d bytes): %s", len(data), e)
            return None

    def recv(self, timeout_s: float) -> Optional[Message]:
        """One decoded message within ``timeout_s``; None on timeout, a wake-up or a rejected
        message."""
        msg = self.recv_nowait()
        if msg is None and self.pull.poll(max(0, math.ceil(timeout_s * 1000))):
            msg = self.recv_nowait()
        return msg

    def has_message(self) -> bool:
        return bool(self.pull.poll(0))

    def close(self) -> None:
        with self._lock:
            for s in self._push.values():
                s.close()
            self._push.clear()
            self.pull.close()
        self.ctx.term()
        self._wakeups.close()


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
    dead_since: Optional[float] = None  # when it was declared dead; None = alive

    @property
    def dead(self) -> bool:
        return self.dead_since is not None


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


class ManagerBase:
    """Buffers + allocator + engine + control thread. Subclasses handle messages and timers."""

    role = "base"

    def __init__(
        self,
        buffer_config: MultimodalBufferConfig,
        config: Optional[ConnectionConfig] = None,
        engine=None,
    ):
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
        logger.info(
            "%s control socket listening on %s, manager id %s",
            self.role,
            self.channel.listening,
            self.manager_id,
        )
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
        # A peer's manager id -> the endpoint this side reaches it at, where they differ: the
        # language side dials the encoder where the router sends it (its --host), which need
        # not be the address the encoder advertises. Learned from the encoder's RegisterAck;
        # every message is handled under the endpoint (``_dispatch``).
        self.reached_at: Dict[str, str] = {}
        self.health: Dict[str, PeerHealth] = {}
        # peer -> last time it had a live request (or registered) here
        self.last_active: Dict[str, float] = {}
        self._nonce = itertools.count(1)
        self._closed = threading.Event()
        # When the control thread's next timer is due (monotonic; math.inf: none, it blocks
        # until a message or a wake-up). Read-only outside the control thread: a thread that
        # adds an earlier timer wakes it.
        self._next_deadline = 0.0
        # exceptions caught in handlers (each failed one request at most)
        self.thread_errors = 0
        self._thread = threading.Thread(
            target=self._control_loop, name=f"el-{self.role}-control", daemon=True
        )
        self._thread.start()

    def _control_port(self) -> int:
        """Port of this side's control socket: any free one (the manager id tells peers)."""
        return 0

    @property
    def bootstrap_addr(self) -> str:
        return self.manager_id

    def wake(self) -> None:
        """Have the control thread re-run its timers and admissions now (called after a local
        state change: a new request, an abort, a finished round)."""
        self.channel.wake()

    # Control thread -------------------------------------------------------------------------
    def _control_loop(self) -> None:
        """Handle every queued message, run the timers (``_tick`` returns when the next one is
        due), then block until a message, a ``wake()`` or that deadline."""
        deadline = 0.0  # run the timers once at start
        while not self._closed.is_set():
            try:
                now = time.monotonic()
                self._next_deadline = deadline
                wait = deadline - now
                self.channel.wait(None if math.isinf(wait) else max(0.0, wait))
                if self._closed.is_set():
                    return
                while True:
                    msg = self.channel.recv_nowait()
                    if msg is not None:
                        self._dispatch(msg)
                    elif not self.channel.has_message():
                        break
                deadline = self._tick(time.monotonic())
            except zmq.ContextTerminated:
                return
            except Exception:
                if self._closed.is_set():
                    return
                deadline = time.monotonic() + 0.05  # run the timers again soon
                self.thread_errors += 1
                logger.exception(
                    "%s control thread: error handling a message or timer", self.role
                )

    def _dispatch(self, msg: Message) -> None:
        endpoint = self.reached_at.get(msg.manager_id)
        if endpoint is not None and not isinstance(msg, RegisterAck):
            # name the sender as this side's tables do, and answer it where it is reached (a
            # RegisterAck keeps the encoder's own id: the language side learns the name from it)
            msg = msgspec.structs.replace(msg, manager_id=endpoint)
        if isinstance(msg, Ping):
            self.channel.send(
                msg.manager_id, make(Pong, manager_id=self.manager_id, nonce=msg.nonce)
            )
        elif isinstance(msg, Pong):
            revived = False
            with self.lock:
                h = self.health.get(msg.manager_id)
                if h is not None and h.outstanding is not None:
                    h.outstanding = None
                    h.missed = 0
                    if h.dead:
                        h.dead_since = None
                        revived = True
            if revived:
                logger.warning(
                    "%s: peer %s answers heartbeats again; revived",
                    self.role,
                    msg.manager_id,
                )
                self._on_peer_revived(msg.manager_id)
        else:
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        raise NotImplementedError

    def _tick(self, now: float) -> float:
        """Run every timer that is due; return when the next one is (``math.inf``: none)."""
        return self._heartbeat(now)

    def _active_peers(self) -> List[str]:
        """Peers with at least one live request; they are pinged, and kept."""
        raise NotImplementedError

    def _heartbeat(self, now: float) -> float:
        """Ping every peer with a live request and every peer declared dead (a pong revives
        it); declare dead after ``heartbeat_max_failures`` missed pongs; forget a peer dead or
        idle for ``peer_prune_s``. Returns when the next ping or prune is due."""
        cfg = self.config
        active = set(self._active_peers())
        dead: List[str] = []
        forget: List[str] = []
        due = math.inf
        with self.lock:
            for ep in active:
                self.last_active[ep] = now
                self.health.setdefault(
                    ep, PeerHealth(ep, next_ping=now + cfg.heartbeat_interval_s)
                )
            for ep, h in list(self.health.items()):
                if h.dead and now - h.dead_since > cfg.peer_prune_s:
                    forget.append(ep)
                    continue
                if not h.dead and ep not in active:
                    del self.health[ep]  # alive and idle: nothing to watch
                    continue
                if h.dead:
                    due = min(due, h.dead_since + cfg.peer_prune_s)
                if now < h.next_ping:
                    due = min(due, h.next_ping)
                    continue
                if (
                    h.outstanding is not None
                    and not h.dead
                    and now - h.next_ping > cfg.heartbeat_interval_s / 2
                ):
                    # This side's timer is late by half an interval: it was not running
                    # (stopped, starved), so the peer's pong may be unread or was never
                    # asked for in time. Not a miss: ask again, a full interval from now.
                    logger.info(
                        "%s: heartbeat to %s ran %.1fs late (this side was not running); "
                        "not counted as missed",
                        self.role,
                        ep,
                        now - h.next_ping,
                    )
                elif h.outstanding is not None and not h.dead:
                    h.missed += 1
                    if h.missed >= cfg.heartbeat_max_failures:
                        # declared below; pinged from the next interval on
                        dead.append(ep)
                        continue
                h.outstanding = next(self._nonce)
                h.next_ping = now + cfg.heartbeat_interval_s
                due = min(due, h.next_ping)
                self.channel.send(
                    ep, make(Ping, manager_id=self.manager_id, nonce=h.outstanding)
                )
            for ep, t in self.last_active.items():
                if ep not in active and ep not in self.health:
                    if now - t > cfg.peer_prune_s:
                        forget.append(ep)
                    else:
                        due = min(due, t + cfg.peer_prune_s)
        for ep in dead:
            n = cfg.heartbeat_max_failures
            self._declare_dead(
                ep,
                f"peer {ep} is unreachable (missed {n} heartbeats): it is down, or cannot "
                f"reach this side's advertised address {self.manager_id}",
            )
        for ep in forget:
            self.forget_peer(ep)
        # A peer declared dead just now is pinged from the next interval on.
        return min(due, now + cfg.heartbeat_interval_s) if dead else due

    def _declare_dead(self, endpoint: str, reason: str) -> None:
        """Mark a peer dead (only a pong to a later ping revives it) and fail its requests."""
        logger.error("%s: %s; failing its requests", self.role, reason)
        with self.lock:
            h = self.health.setdefault(endpoint, PeerHealth(endpoint))
            h.dead_since = time.monotonic()
            h.outstanding = None
            h.next_ping = h.dead_since + self.config.heartbeat_interval_s
        # Called on the control thread (the heartbeat): its next _tick times the fences.
        self._on_peer_dead(endpoint, reason)

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        raise NotImplementedError

    def _on_peer_revived(self, endpoint: str) -> None:
        pass

    def peer_is_dead(self, endpoint: str) -> bool:
        with self.lock:
            h = self.health.get(endpoint)
            return bool(h and h.dead)

    def forget_peer(self, endpoint: str) -> None:
        """Drop everything kept for a peer that went away (dead or idle for ``peer_prune_s``):
        health, registration, PUSH socket. It registers again if it comes back."""
        with self.lock:
            self.health.pop(endpoint, None)
            self.last_active.pop(endpoint, None)
            self._drop_registration(endpoint)
            for name in [n for n, ep in self.reached_at.items() if ep == endpoint]:
                del self.reached_at[name]
        self.channel.close_peer(endpoint)
        logger.info("%s: forgot peer %s", self.role, endpoint)

    def _drop_registration(self, endpoint: str) -> None:
        raise NotImplementedError

    # Lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.wake()
        self._thread.join(timeout=5)
        self._close_workers()
        self.channel.close()
        self.buffers.deregister()

    def _close_workers(self) -> None:
        pass


__all__ = [
    "ConnectionConfig",
    "ControlChannel",
    "FaultKind",
    "KVPoll",
    "ManagerBase",
    "RoomInUseError",
    "make_transfer_engine",
    "peer_endpoint",
    "PeerAddressError",
    "PeerLookups",
    "TransferError",
    "TransferRequest",
    "WakePipe",
]
