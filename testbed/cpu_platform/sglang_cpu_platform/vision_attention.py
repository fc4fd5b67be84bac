"""Per-image vision attention on CPU: the ``cu_seqlens``-aware SDPA that GPU backends give.

On a platform without a vendor backend, upstream's ``VisionAttention`` picks ``"sdpa"``
(``VisionSdpaAttention``). With ``flatten_batch`` (Qwen3-VL and most packed ViTs) that class
runs one attention over the whole call, all images of a batch packed together, under a dense
block-diagonal ``[1, S, S]`` mask: time and memory O(S^2) in the call's total patches, so a
vision-tower call over N images costs O(N^2). The GPU backends (fa3, fa4, triton) attend within
each ``cu_seqlens`` segment (one image, or one video frame) instead. This plugin registers a
subclass under ``"sdpa"`` that does the same on CPU: one SDPA per segment, no mask, the same
result (masked-out keys carry zero weight) at O(sum of s_i^2).

It is installed when ``sglang.srt.layers.attention.vision`` is imported, in every process of a
server on this platform (the colocated scheduler, the encode side, upstream's
``--encoder-only`` server), before any model is built (the backend class is looked up when
``VisionAttention`` is constructed).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

VISION_MODULE = "sglang.srt.layers.attention.vision"

# Prometheus counter of the segments (images, video frames) attended, summed over vision
# blocks: divided by the tower's depth it counts the images and frames each server encoded
# (a benchmark reads it from /metrics; nothing else does).
SEGMENTS_METRIC = "sglang:testbed_vision_attention_segments"
_segments_counter = None


def _count_segments(n: int) -> None:
    global _segments_counter
    if _segments_counter is None:
        # Created lazily in the process that runs the vision tower (a scheduler subprocess),
        # after SGLang has set PROMETHEUS_MULTIPROC_DIR, so /metrics aggregates it.
        from prometheus_client import Counter

        _segments_counter = Counter(
            name=SEGMENTS_METRIC,
            documentation="Vision-attention segments (images, video frames) attended, "
            "summed over vision blocks (CPU test bed).",
        )
    _segments_counter.inc(n)


def make_per_image_sdpa(base: type) -> type:
    """``base`` (upstream's ``VisionSdpaAttention``) with a per-segment forward for the
    packed (``flatten_batch``) case; every other case goes to ``base`` unchanged."""

    class PerImageSdpaAttention(base):
        def forward(self, q, k, v, bsz, cu_seqlens=None, attention_mask=None, **kwargs):
            if (
                not self.flatten_batch
                or cu_seqlens is None
                or attention_mask is not None
                or self.softmax_in_single_precision
                or not hasattr(cu_seqlens, "tolist")
            ):
                return super().forward(
                    q,
                    k,
                    v,
                    bsz,
                    cu_seqlens=cu_seqlens,
                    attention_mask=attention_mask,
                    **kwargs,
                )
            import torch
            import torch.nn.functional as F

            bounds = cu_seqlens.tolist()
            out = q.new_empty(q.shape[0], self.num_heads, self.head_size)
            for start, end in zip(bounds[:-1], bounds[1:]):
                # [s_i, h, d] -> [h, s_i, d]: attend within this image (frame) only
                qi, ki, vi = (x[start:end].transpose(0, 1) for x in (q, k, v))
                oi = F.scaled_dot_product_attention(
                    qi,
                    ki,
                    vi,
                    dropout_p=self.dropout,
                    is_causal=False,
                    scale=self.scale,
                )
                out[start:end] = oi.transpose(0, 1)
            _count_segments(len(bounds) - 1)
            return out

    PerImageSdpaAttention.__qualname__ = PerImageSdpaAttention.__name__
    PerImageSdpaAttention.__module__ = __name__
    return PerImageSdpaAttention


def patch_vision_module(module) -> None:
    """Register the per-image class under ``"sdpa"`` in ``module.QKV_BACKEND_IMPL``."""
    table = module.QKV_BACKEND_IMPL
    if getattr(table["sdpa"], "_per_image", False):
        return
    cls = make_per_image_sdpa(table["sdpa"])
    cls._per_image = True
    table["sdpa"] = cls


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: load the vision module normally, then patch it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != VISION_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        patch_vision_module(module)


def install() -> None:
    """Patch the vision module now if it is loaded, else as soon as it is imported."""
    module = sys.modules.get(VISION_MODULE)
    if module is not None and hasattr(module, "QKV_BACKEND_IMPL"):
        patch_vision_module(module)
    elif not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
