"""Requests an encode server refuses before its scheduler sees them.

The encode server's tokenizer manager loads and processes the media. When that fails (an image
URL that cannot be read, bytes that are not an image, a client that disconnects meanwhile), the
request never reaches the scheduler and no ``EncodeSender`` exists for its bootstrap room, while
the language server, which got the same body from the router, has reserved (or will reserve)
blocks for that room. ``request_refused`` tells the scheduler (an ``AbortReq`` whose finished
reason names the room, ``room_failure``) so that ``EncodeManager.fail_room`` answers the
language side with Abort(reason, kind) at once. The encode server answers with the kind's status
(400 for a client fault, 504 for a timeout, 503 for a broken connection, 500 otherwise); the
language server answers the same (``status_of_transfer_failure``), so the router, which returns
the error of whichever side failed, gives the client that status either way.

Faults are typed: every failure carries a ``FaultKind`` (``manifest.py``), in the control
messages (``Abort.kind``) and on the senders and receivers; ``http_status`` is the one place that
maps a kind to the HTTP answer, ``fault_of_exception`` the one place that classifies what stopped
a request before the scheduler. No reason text is parsed.

``poll_and_end_failed``: upstream's ``poll_and_all_reduce`` (which also injects failures with
``SGLANG_TEST_DISAGG_FAILURE_PROB``) for both schedulers, ending in the transport every request
the agreed poll fails, so an injected (or another rank's) failure never leaves the room open on
either side.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import requests
from fastapi import HTTPException

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.manifest import FaultKind
from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST, poll_and_all_reduce
from sglang.srt.environ import envs
from sglang.srt.managers.io_struct import AbortReq

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager

logger = logging.getLogger(__name__)

# Prefix of a client fault's reason, for the people who read it (the status comes from the kind).
CLIENT_FAULT = "client error"
# Keys of the failed bootstrap room and its fault kind in the AbortReq's finished_reason.
ROOM_KEY = "encode_language_failed_room"
KIND_KEY = "encode_language_fault_kind"

# The HTTP answer of each fault kind, on both sides.
_STATUS = {
    FaultKind.CLIENT: HTTPStatus.BAD_REQUEST,
    FaultKind.TIMEOUT: HTTPStatus.GATEWAY_TIMEOUT,
    FaultKind.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    FaultKind.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
    # Not a failure: the language side runs such a request as it is, nothing answers this.
    FaultKind.NO_TRANSFER: HTTPStatus.INTERNAL_SERVER_ERROR,
}


def http_status(kind: FaultKind) -> HTTPStatus:
    """The one mapping from a fault kind to the HTTP status either server answers."""
    return _STATUS[kind]


def fault_of_exception(exc: BaseException) -> FaultKind:
    """What ``exc``, raised while the encode server loaded and processed a request, says about
    whose fault it is. A timeout (``TimeoutError``, a media download past upstream's
    ``REQUEST_TIMEOUT``: ``requests.Timeout``) or a broken connection of this server
    (``ConnectionError``) is not the client's: the same request may work later. Media that
    cannot be read (a missing file, an HTTP error status, a URL nobody answers at:
    ``requests.RequestException``), cannot be decoded (PIL's ``UnidentifiedImageError``, an
    ``OSError``) and upstream's request validation (``ValueError``) are."""
    if isinstance(exc, asyncio.CancelledError):
        return FaultKind.CLIENT  # the client disconnected
    if isinstance(exc, (TimeoutError, requests.Timeout)):
        return FaultKind.TIMEOUT
    if isinstance(exc, ConnectionError):  # requests' own ConnectionError is not one
        return FaultKind.UNAVAILABLE
    if isinstance(exc, (OSError, ValueError)):
        return FaultKind.CLIENT
    return FaultKind.INTERNAL


class RequestRefusedError(HTTPException):
    """What the encode server raises for a request it refused, not the client's fault, before
    its scheduler: upstream answers an ``HTTPException`` with its ``status_code`` on
    ``/generate`` (the app's HTTPException handler) and on the OpenAI endpoints
    (``OpenAIServingBase.handle_request``). Not a ValueError: those endpoints answer any
    ValueError 400. A client fault is raised as a plain ValueError: 400 everywhere."""

    def __init__(self, reason: str, kind: FaultKind):
        super().__init__(status_code=int(http_status(kind)), detail=reason)
        self.kind = kind


def _undispatched_rooms(obj, request_states: Dict[str, "ReqState"]) -> List[int]:
    """Bootstrap rooms of the (sub-)requests of ``obj`` that never reached the scheduler (a
    dispatched one has a sender, which the scheduler's abort path ends)."""
    if obj.bootstrap_room is None or obj.bootstrap_host == FAKE_BOOTSTRAP_HOST:
        return []  # no transfer (health check, warm-up, no router)
    rids = [obj.rid] if obj.is_single else obj.rid
    rooms = [obj.bootstrap_room] if obj.is_single else obj.bootstrap_room
    return [
        room
        for rid, room in zip(rids, rooms)
        if room is not None
        and rid in request_states
        and not request_states[rid].dispatched
    ]


def request_refused(
    tokenizer_manager: "TokenizerManager",
    obj,
    request_states: Dict[str, "ReqState"],
    exc: BaseException,
) -> BaseException:
    """Fail the bootstrap rooms of the requests of ``obj`` that ``exc`` stopped before the
    scheduler; returns what to raise, which upstream answers with the kind's status, the one
    the language side answers too: a ValueError (400) for a client fault, a
    ``RequestRefusedError`` (504, 503) for a timeout or a broken connection, the exception
    itself for an internal error (upstream answers 500 and logs it) and for a client that
    disconnected (its CancelledError).
    """
    rooms = _undispatched_rooms(obj, request_states)
    if isinstance(exc, GeneratorExit) or not rooms:
        return exc  # the caller stopped reading, or nothing waits for this request
    kind, to_raise = fault_of_exception(exc), exc
    if isinstance(exc, asyncio.CancelledError):
        reason = "aborted by the client (disconnected)"
    elif kind == FaultKind.CLIENT:
        # OSError: media that cannot be read; ValueError: upstream's request validation
        # (context length, bytes that do not decode, ...), whose message says what is wrong
        what = (
            "the request's media cannot be used"
            if isinstance(exc, OSError)
            else "invalid request"
        )
        reason = client_fault(f"{what}: {exc}")
        to_raise = ValueError(reason)  # upstream's HTTP 400
    else:
        reason = f"encode server error ({kind.value}): {type(exc).__name__}: {exc}"
        if kind != FaultKind.INTERNAL:  # a timeout (504) or a broken connection (503)
            to_raise = RequestRefusedError(reason, kind)
    if to_raise is not exc:
        to_raise.__cause__ = exc
    status = http_status(kind)
    for room in rooms:
        logger.error("encode: room %s refused before the transfer: %s", room, reason)
        tokenizer_manager._dispatch_to_scheduler(
            AbortReq(
                rid=f"encode-refused-{room}",
                finished_reason={
                    "type": "abort",
                    "message": reason,
                    "status_code": int(status),
                    ROOM_KEY: room,
                    KIND_KEY: kind.value,
                },
            )
        )
    return to_raise


def room_failure(recv_req: AbortReq) -> Optional[Tuple[int, str, FaultKind]]:
    """(room, reason, kind) when ``recv_req`` was sent by ``request_refused``, else None."""
    reason = recv_req.finished_reason
    if not reason or reason.get(ROOM_KEY) is None:
        return None
    kind = FaultKind(reason.get(KIND_KEY, FaultKind.INTERNAL.value))
    return int(reason[ROOM_KEY]), str(reason.get("message")), kind


def client_fault(message: str) -> str:
    """The reason text of a client fault (its kind, ``FaultKind.CLIENT``, travels apart)."""
    return f"{CLIENT_FAULT}: {message}"


def status_of_transfer_failure(transfer) -> HTTPStatus:
    """Either side's answer for a failed transfer: the status of the sender's or receiver's
    ``kind`` (a scheduler's stand-in for another TP rank has none: a server error)."""
    return http_status(getattr(transfer, "kind", None) or FaultKind.INTERNAL)


def poll_and_end_failed(transfers: Sequence, group) -> List[int]:
    """Upstream's ``poll_and_all_reduce`` over ``transfers`` (senders, receivers or their TP
    stand-ins), then ``abort`` each one the agreed poll reports Failed while its own state is
    not: a failure injected by ``SGLANG_TEST_DISAGG_FAILURE_PROB`` (upstream injects it into the
    poll only), or one of another TP rank. The transport then ends the room on both sides, so
    nothing keeps blocks or waits for a request the scheduler dropped."""
    polls = poll_and_all_reduce(transfers, group)
    for t, poll in zip(transfers, polls):
        if poll == KVPoll.Failed and t.poll() != KVPoll.Failed:
            injected = envs.SGLANG_TEST_DISAGG_FAILURE_PROB.get() > 0
            t.abort(  # kind: INTERNAL, every transfer's default
                "failure injected by SGLANG_TEST_DISAGG_FAILURE_PROB"
                if injected
                else "the transfer failed on another tensor-parallel rank"
            )
    return polls
