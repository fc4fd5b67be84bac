"""Requests an encode server refuses before its scheduler sees them.

The encode server's tokenizer manager loads and processes the media. When that fails (an image
URL that cannot be read, bytes that are not an image, a client that disconnects meanwhile), the
request never reaches the scheduler and no ``EncodeSender`` exists for its bootstrap room, while
the language server, which got the same body from the router, has reserved (or will reserve)
blocks for that room. ``request_refused`` tells the scheduler (an ``AbortReq`` whose finished
reason names the room, ``room_failure``) so that ``EncodeManager.fail_room`` answers the
language side with Abort(reason) at once, and maps a client fault to HTTP 400 on the encode
server; the language server answers 400 too (``status_of_transfer_failure``) so the router, which
returns the error of whichever side failed, gives the client a 4xx either way.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST
from sglang.srt.managers.io_struct import AbortReq

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager

logger = logging.getLogger(__name__)

# Prefix of the reason a client fault travels with: the language side answers 400 on it.
CLIENT_FAULT = "client error"
# Key of the failed bootstrap room in the AbortReq's finished_reason.
ROOM_KEY = "encode_language_failed_room"
# Media that cannot be loaded or decoded: FileNotFoundError, requests' connection and HTTP
# errors, PIL's UnidentifiedImageError are OSErrors; upstream raises ValueError for bytes that
# do not decode.
CLIENT_FAULT_ERRORS = (OSError, ValueError)


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
    scheduler; returns what to raise (a ValueError, i.e. HTTP 400, for a client fault).
    """
    rooms = _undispatched_rooms(obj, request_states)
    if isinstance(exc, GeneratorExit) or not rooms:
        return exc  # the caller stopped reading, or nothing waits for this request
    if isinstance(exc, asyncio.CancelledError):
        reason, status, to_raise = (
            "aborted by the client (disconnected)",
            HTTPStatus.BAD_REQUEST,
            exc,
        )
    elif isinstance(exc, CLIENT_FAULT_ERRORS):
        # OSError: media that cannot be read; ValueError: upstream's request validation
        # (context length, bytes that do not decode, ...), whose message says what is wrong
        what = (
            "the request's media cannot be used"
            if isinstance(exc, OSError)
            else "invalid request"
        )
        reason = client_fault(f"{what}: {exc}")
        status, to_raise = HTTPStatus.BAD_REQUEST, ValueError(reason)
        to_raise.__cause__ = exc
    else:
        reason = f"encode server error: {type(exc).__name__}: {exc}"
        status, to_raise = HTTPStatus.INTERNAL_SERVER_ERROR, exc
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
                },
            )
        )
    return to_raise


def room_failure(recv_req: AbortReq) -> Optional[Tuple[int, str]]:
    """(room, reason) when ``recv_req`` was sent by ``request_refused``, else None."""
    reason = recv_req.finished_reason
    if not reason or reason.get(ROOM_KEY) is None:
        return None
    return int(reason[ROOM_KEY]), str(reason.get("message"))


def client_fault(message: str) -> str:
    """A failure reason the client caused: both sides answer it with 400."""
    return f"{CLIENT_FAULT}: {message}"


def status_of_transfer_failure(reason: str) -> HTTPStatus:
    """Either side's answer for a transfer that failed with ``reason``: 400 for a client fault,
    the reason itself (encode side) or quoted by the language side's receiver ("encoder <id>
    aborted: <reason>", a refused reservation "... aborted: request already failed: <reason>").
    """
    fault = f"{CLIENT_FAULT}: "
    return (
        HTTPStatus.BAD_REQUEST
        if reason.startswith(fault) or f": {fault}" in reason
        else HTTPStatus.INTERNAL_SERVER_ERROR
    )
