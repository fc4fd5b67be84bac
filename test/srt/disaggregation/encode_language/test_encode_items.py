"""The encode scheduler's vision-tower step (``_encode_items``) keeps rows it owns.

Its rows outlive the next vision-tower run: they are cached for later requests, and a batch's
image rows wait for its video run before ``_payload`` stages them. A vision tower under CUDA
graphs (``SGLANG_VIT_ENABLE_CUDA_GRAPH``) returns its graph's static output buffer, which the
next run of that graph overwrites. CUDA graphs do not exist on this CPU, so the model here is
a stand-in whose feature functions return one buffer per row count, refilled on every call
(what a graph replay does); the cache is the real one (SGLang's ``mm_schedule`` cache)."""

from __future__ import annotations

import dataclasses
import types

import torch

from sglang.srt.disaggregation.encode_language.encode_scheduler import (
    SchedulerDisaggregationEncodeMixin,
)
from sglang.srt.disaggregation.encode_language.encoder_cache import (
    EncoderEmbeddingCache,
)
from sglang.srt.managers import mm_schedule
from sglang.srt.multimodal.modality import Modality

DIM = 8


@dataclasses.dataclass
class _Item:
    hash: int
    offsets: list
    modality: Modality = Modality.IMAGE


class _GraphLikeVisionTower:
    """``get_image_feature`` / ``get_video_feature`` writing into one static buffer per row
    count (shared by both modalities, as one graph per input shape would be)."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}

    def _run(self, items) -> torch.Tensor:
        rows = [
            torch.full((e - s + 1, DIM), float(item.hash))
            for item in items
            for s, e in item.offsets
        ]
        out = torch.cat(rows)
        buf = self.buffers.setdefault(out.shape[0], torch.empty_like(out))
        return buf.copy_(out)

    get_image_feature = get_video_feature = _run


def _scheduler(model) -> types.SimpleNamespace:
    mm_schedule.init_mm_embedding_cache(1 << 20)
    cache = EncoderEmbeddingCache(
        max_bytes=1 << 20, dim=DIM, dtype=torch.float32, is_owner=True
    )
    return types.SimpleNamespace(
        tp_worker=types.SimpleNamespace(
            model_runner=types.SimpleNamespace(model=model)
        ),
        disagg_encode_cache=cache,
        disagg_encode_metrics=types.SimpleNamespace(vit_call=lambda tokens: None),
    )


def _request(*items) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        multimodal_inputs=types.SimpleNamespace(mm_items=list(items))
    )


def _encode(scheduler, *reqs) -> dict:
    return SchedulerDisaggregationEncodeMixin._encode_items(scheduler, list(reqs))


def _expected(item) -> torch.Tensor:
    return torch.full((4, DIM), float(item.hash))


def test_a_cached_image_keeps_its_rows_after_another_image_of_its_size() -> None:
    scheduler = _scheduler(_GraphLikeVisionTower())
    x, y = _Item(71, [[0, 3]]), _Item(72, [[0, 3]])
    _encode(scheduler, _request(x))
    _encode(scheduler, _request(y))  # the same buffer, refilled with y's rows
    x_again = _Item(71, [[5, 8]])
    rows = _encode(scheduler, _request(x_again))  # a hit: no vision-tower run
    assert torch.equal(rows[id(x_again)], _expected(x))


def test_an_image_keeps_its_rows_after_the_batch_video_of_its_size() -> None:
    scheduler = _scheduler(_GraphLikeVisionTower())
    image, video = _Item(81, [[0, 3]]), _Item(82, [[6, 9]], Modality.VIDEO)
    rows = _encode(scheduler, _request(image, video))
    assert torch.equal(rows[id(image)], _expected(image))
    assert torch.equal(rows[id(video)], _expected(video))
