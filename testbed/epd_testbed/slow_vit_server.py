"""Test-bed control: ``python -m epd_testbed.slow_vit_server <launch_server args>``.

An encode server whose vision-tower calls take ``EPD_VIT_SECONDS_PER_TOKEN`` seconds longer
per placeholder token they produce. It stands in for a production-size vision tower: the tiny
checkpoint's runs in milliseconds, so without it a burst never queues on the encoder as it does
with large images on a real one. The patch is made at import of this module, which SGLang's
spawned scheduler processes import again as their ``__main__``.

``EPD_VIT_PAUSE_FILE``: while that file exists, a vision-tower call that has run does not return
(its requests hold the language side's round-0 blocks, unwritten): a test makes "an encoder dies
between reservation and write" happen on purpose instead of racing for it.
"""

from __future__ import annotations

import os
import runpy
import time

from sglang.srt.disaggregation.encode_language.encode_scheduler import (
    SchedulerDisaggregationEncodeMixin as _Mixin,
)

_SECONDS_PER_TOKEN = float(os.environ.get("EPD_VIT_SECONDS_PER_TOKEN", "0"))
_PAUSE_FILE = os.environ.get("EPD_VIT_PAUSE_FILE")
_encode_items = _Mixin._encode_items


def _slow_encode_items(self, reqs):
    rows = _encode_items(self, reqs)
    time.sleep(_SECONDS_PER_TOKEN * sum(r.shape[0] for r in rows.values()))
    while _PAUSE_FILE and os.path.exists(_PAUSE_FILE):
        time.sleep(0.05)
    return rows


_Mixin._encode_items = _slow_encode_items

if __name__ == "__main__":
    # alter_sys=False keeps this module as __main__, so spawned children re-import it.
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=False)
