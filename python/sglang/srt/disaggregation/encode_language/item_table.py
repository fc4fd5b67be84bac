"""The per-item table an encode server sends with a request's last round.

One entry per image or video, in prompt order::

    [modality, offsets, hash, identity]
    modality  "image" | "video"
    offsets   [[start, end], ...]  token spans in the request's ids, end inclusive (SGLang's
              ``MultimodalDataItem.offsets`` convention); a video has one span per frame
    hash      the encode side's 64-bit content hash of the item (from its pixels)
    identity  the encode side's 32-byte identity digest, or None

The language side turns each entry into a ``MultimodalDataItem`` whose pad values derive from
this hash, so the radix cache keys an image by its content without the language side hashing
megabytes of rows: the same image gives a prefix hit, two different images never share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

from sglang.srt.multimodal.modality import Modality

_MODALITIES = {"image": Modality.IMAGE, "video": Modality.VIDEO}


class ItemTableError(ValueError):
    """The item table does not describe the received request."""


@dataclasses.dataclass(frozen=True)
class ItemEntry:
    modality: str
    offsets: Tuple[Tuple[int, int], ...]
    hash: int
    identity: Optional[bytes] = None

    @property
    def num_tokens(self) -> int:
        return sum(end - start + 1 for start, end in self.offsets)

    @property
    def sglang_modality(self) -> Modality:
        return _MODALITIES[self.modality]

    def to_wire(self) -> list:
        return [
            self.modality,
            [list(span) for span in self.offsets],
            self.hash,
            self.identity,
        ]

    @classmethod
    def from_wire(cls, raw: Any) -> "ItemEntry":
        try:
            modality, offsets, hash_value, identity = raw
            entry = cls(
                str(modality),
                tuple((int(s), int(e)) for s, e in offsets),
                int(hash_value),
                None if identity is None else bytes(identity),
            )
        except (TypeError, ValueError) as e:
            raise ItemTableError(f"malformed item table entry {raw!r}: {e}") from None
        if entry.modality not in _MODALITIES:
            raise ItemTableError(
                f"unknown modality {entry.modality!r} in the item table"
            )
        if not entry.offsets or any(s < 0 or e < s for s, e in entry.offsets):
            raise ItemTableError(f"bad token spans {entry.offsets} in the item table")
        return entry


def item_table(mm_items: Sequence[Any]) -> List[ItemEntry]:
    """Entries for the image/video ``MultimodalDataItem``s of a processed request, in prompt
    order (by first token)."""
    entries = []
    for item in mm_items:
        if item.modality not in (Modality.IMAGE, Modality.VIDEO):
            raise ItemTableError(
                f"modality {item.modality} is not supported by encode/language disaggregation"
            )
        if item.hash is None or not item.offsets:
            raise ItemTableError(
                "a multimodal item without hash or offsets cannot be sent"
            )
        entries.append(
            ItemEntry(
                item.modality.name.lower(),
                tuple((int(s), int(e)) for s, e in item.offsets),
                int(item.hash),
                item.identity,
            )
        )
    return sorted(entries, key=lambda e: e.offsets[0][0])


def check_against_mask(entries: Sequence[ItemEntry], mm_mask) -> None:
    """The spans must cover exactly the multimodal tokens of the request, without overlap."""
    covered = [0] * len(mm_mask)
    for entry in entries:
        for start, end in entry.offsets:
            if end >= len(mm_mask):
                raise ItemTableError(
                    f"span [{start}, {end}] beyond the request's {len(mm_mask)} tokens"
                )
            for t in range(start, end + 1):
                covered[t] += 1
    if covered != [int(bool(m)) for m in mm_mask.tolist()]:
        raise ItemTableError(
            "item spans do not cover exactly the multimodal tokens of the request"
        )
