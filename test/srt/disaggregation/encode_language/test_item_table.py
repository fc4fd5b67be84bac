"""The item table an encode server sends with the last round (item_table.py): built from
SGLang's multimodal items in prompt order, carried as plain lists, checked on arrival."""

from __future__ import annotations

import msgspec
import pytest
import torch
from sglang.srt.disaggregation.encode_language.item_table import (
    ItemEntry,
    ItemTableError,
    check_against_mask,
    item_table,
)
from sglang.srt.managers.schedule_batch import MultimodalDataItem
from sglang.srt.multimodal.modality import Modality


def _item(modality: Modality, offsets, hash_value: int) -> MultimodalDataItem:
    item = MultimodalDataItem(modality=modality, offsets=offsets)
    item.set_hash(hash_value)
    return item


def test_entries_in_prompt_order_survive_msgpack() -> None:
    video = _item(Modality.VIDEO, [(10, 13), (16, 19)], 2**63 + 5)
    image = _item(Modality.IMAGE, [(2, 5)], 7)
    entries = item_table([video, image])
    assert [e.modality for e in entries] == ["image", "video"]
    assert entries[1].offsets == ((10, 13), (16, 19)) and entries[1].num_tokens == 8
    wire = msgspec.msgpack.decode(
        msgspec.msgpack.encode([e.to_wire() for e in entries])
    )
    assert [ItemEntry.from_wire(raw) for raw in wire] == entries
    assert entries[1].hash == video.hash  # the encoder's content hash, unchanged


def test_an_item_without_hash_cannot_be_sent() -> None:
    with pytest.raises(ItemTableError, match="without hash or offsets"):
        item_table([MultimodalDataItem(modality=Modality.IMAGE, offsets=[(0, 1)])])


@pytest.mark.parametrize(
    "raw, message",
    [
        (["audio", [[0, 1]], 1, None], "unknown modality 'audio'"),
        (["image", [[3, 1]], 1, None], "bad token spans"),
        (["image", [], 1, None], "bad token spans"),
        (["image", [[0, 1]]], "malformed item table entry"),
    ],
)
def test_malformed_entries_are_refused(raw, message) -> None:
    with pytest.raises(ItemTableError, match=message):
        ItemEntry.from_wire(raw)


def test_spans_must_cover_exactly_the_multimodal_tokens() -> None:
    mask = torch.tensor([False, True, True, False, True, True])
    check_against_mask(
        [ItemEntry("image", ((1, 2),), 1), ItemEntry("image", ((4, 5),), 2)], mask
    )
    with pytest.raises(ItemTableError, match="do not cover exactly"):
        check_against_mask([ItemEntry("image", ((1, 2),), 1)], mask)
    with pytest.raises(ItemTableError, match="do not cover exactly"):
        check_against_mask(
            [ItemEntry("image", ((1, 2),), 1), ItemEntry("image", ((2, 5),), 2)], mask
        )
    with pytest.raises(ItemTableError, match="beyond the request"):
        check_against_mask([ItemEntry("image", ((4, 6),), 1)], mask)
