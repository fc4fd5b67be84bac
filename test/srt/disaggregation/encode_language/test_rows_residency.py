"""Where a language request's received rows live (issue: issue 16 item 4).

The rows stay with the request for its whole life in host memory (pinned on GPU hosts:
``rows_to_host`` at ``_attach``); the forward of each extend batch gets the rows of the items
its chunk covers on its own device, and the request keeps its host rows afterwards, also when
the forward fails. The GPU half (the copies, their stream order, the device memory held) is
``gpu/test_rows_host_residency.py``; this test runs the deciding logic on the CPU: PyTorch's
``meta`` device stands in for the GPU (the copies to it are real ``Tensor.to`` calls, without
data), and upstream's ``prepare_mm_inputs`` is replaced by a recorder of what it is given (it
cannot embed meta tensors); everything else is the code under test.
"""

import types

import pytest
import torch

from sglang.srt.disaggregation.encode_language import language_mm_inputs
from sglang.srt.disaggregation.encode_language.language_mm_inputs import (
    LanguageMultimodalInputs,
    rows_to_host,
    stage_rows,
)
from sglang.srt.managers import mm_utils
from sglang.srt.managers.schedule_batch import MultimodalDataItem
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.multimodal.modality import Modality, MultimodalInputFormat

H, K = 8, 3
META = torch.device("meta")


def item(first: int, n: int) -> MultimodalDataItem:
    return MultimodalDataItem(
        modality=Modality.IMAGE,
        offsets=[(first, first + n - 1)],
        format=MultimodalInputFormat.PRECOMPUTED_EMBEDDING,
        precomputed_embeddings=torch.randn(n, (1 + K) * H),
    )


def requests():
    """Two image requests and a text-only one, as one extend batch holds them."""
    a = types.SimpleNamespace(mm_items=[item(2, 4), item(10, 4)])
    b = types.SimpleNamespace(mm_items=[item(0, 6)])
    return [a, None, b]


def model():
    vl = types.SimpleNamespace(
        text_config=types.SimpleNamespace(hidden_size=H),
        vision_config=types.SimpleNamespace(deepstack_visual_indexes=[1, 2, 3]),
    )
    return LanguageMultimodalInputs(vl)


def extend_batch(mm_inputs, prefix, lens):
    return types.SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        mm_inputs=mm_inputs,
        contains_mm_inputs=lambda: True,
        extend_prefix_lens_cpu=prefix,
        extend_seq_lens_cpu=lens,
    )


@pytest.fixture
def seen(monkeypatch):
    """Upstream's ``prepare_mm_inputs`` replaced by a recorder: the device of each item's rows
    as the embedding sees them."""
    calls = []

    def recorder(input_ids, forward_batch, *a, **kw):
        calls.append(
            [
                [i.precomputed_embeddings.device.type for i in mm.mm_items]
                for mm in forward_batch.mm_inputs
                if mm is not None
            ]
        )
        if getattr(forward_batch, "fail", False):
            raise RuntimeError("forward failed")
        return "embeds"

    monkeypatch.setattr(mm_utils, "prepare_mm_inputs", recorder)
    return calls


def test_host_rows_stay_on_the_host():
    rows = torch.randn(4, (1 + K) * H)
    assert rows_to_host(rows) is rows


def test_the_forward_gets_the_rows_its_chunk_covers_on_its_device(seen):
    mm = requests()
    hosts = [[i.precomputed_embeddings for i in r.mm_items] for r in mm if r]
    # request a: tokens [0, 8) cover its first item only; b: tokens [3, 7) its item
    batch = extend_batch(mm, [0, 0, 3], [8, 5, 4])
    out, _ = model().embed(torch.zeros(17, dtype=torch.long, device=META), batch, None)
    assert out == "embeds"
    assert seen == [[["meta", "cpu"], ["meta"]]]
    # afterwards every request holds its own host rows again, the same tensors
    assert [[i.precomputed_embeddings for i in r.mm_items] for r in mm if r] == hosts
    # the next chunk of request a (tokens [8, 16)) gets its second item
    seen.clear()
    model().embed(
        torch.zeros(8, dtype=torch.long, device=META),
        extend_batch(mm[:1], [8], [8]),
        None,
    )
    assert seen == [[["cpu", "meta"]]]


def test_a_failed_forward_leaves_the_host_rows(seen):
    mm = requests()
    hosts = [[i.precomputed_embeddings for i in r.mm_items] for r in mm if r]
    batch = extend_batch(mm, [0, 0, 0], [16, 5, 6])
    batch.fail = True
    with pytest.raises(RuntimeError, match="forward failed"):
        model().embed(torch.zeros(27, dtype=torch.long, device=META), batch, None)
    assert seen == [[["meta", "meta"], ["meta"]]]
    assert [[i.precomputed_embeddings for i in r.mm_items] for r in mm if r] == hosts


def test_rows_already_on_the_forward_device_are_left_alone():
    mm = requests()
    assert stage_rows(mm, [0, 0, 0], [16, 5, 6], torch.device("cpu")) == []
    assert language_mm_inputs.restore_rows([]) is None
