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
from typing import TYPE_CHECKING, List, Optional, Tuple

from sglang.srt.managers.io_struct import AbortReq

if TYPE_CHECKING:
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

# Prefix of the reason a client fault travels with: the language side answers 400 on it.
CLIENT_FAULT = "client error"
# Key of the failed bootstrap room in the AbortReq's finished_reason.
ROOM_KEY = "encode_language_failed_room"
# Media that cannot be loaded or decoded: FileNotFoundError, requests' connection and HTTP
# errors, PIL's UnidentifiedImageError are OSErrors; upstream raises ValueError for bytes that
# do not decode.
CLIENT_FAULT_ERRORS = (OSError, ValueError)


def _rooms(obj) -> List[int]:
    rooms = getattr(obj, "bootstrap_room", None)
    if rooms is None:
        return []
    rooms = rooms if isinstance(rooms, list) else [rooms]
    return [room for room in rooms if room is not None]


def request_refused(
    tokenizer_manager: "TokenizerManager", obj, exc: BaseException
) -> BaseException:
    """Fail the bootstrap rooms of ``obj`` on this encode server; returns what to raise."""
    if isinstance(exc, asyncio.CancelledError):
        reason, status, to_raise = (
            "aborted by the client (disconnected)",
            HTTPStatus.BAD_REQUEST,
            exc,
        )
    elif isinstance(exc, CLIENT_FAULT_ERRORS):
        reason = f"{CLIENT_FAULT}: the request's media cannot be used: {exc}"
        status, to_raise = HTTPStatus.BAD_REQUEST, ValueError(reason)
        to_raise.__cause__ = exc
    else:
        reason = f"encode server error: {type(exc).__name__}: {exc}"
        status, to_raise = HTTPStatus.INTERNAL_SERVER_ERROR, exc
    for room in _rooms(obj):
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


def status_of_transfer_failure(reason: str) -> HTTPStatus:
    """The language side's answer for a transfer that failed with ``reason``."""
    # the receiver reports an encoder's Abort as "encoder <id> aborted: <reason>"
    return (
        HTTPStatus.BAD_REQUEST
        if f"aborted: {CLIENT_FAULT}: " in reason
        else HTTPStatus.INTERNAL_SERVER_ERROR
    )
