"""Start-up validation and defaults of ``--disaggregation-mode encode|language``.

Called from upstream's ``handle_pd_disaggregation`` (after ``mooncake_tcp`` became
``mooncake``), so a wrong combination fails before any process is started, with a message
that names the flag to change.

What each mode implies:

* ``encode``: the checkpoint's VL class is built with upstream's ``encoder_only`` switch (vision
  tower only); the scheduler runs the encode loop (``encode_scheduler.py``). Its control socket
  listens on ``--disaggregation-bootstrap-port`` (the port given after ``--prefill URL`` to
  the router). Overlap scheduling is off (the encode loop does not use it). With ``--tp N``
  every rank runs the TP vision tower and rank 0 alone owns the transfer.
* ``language``: ``Qwen3MoeForCausalLM`` is built from the VL checkpoint (the architecture is
  overridden unless ``--json-model-override-args`` already names one); no multimodal processor
  runs there; requests with media wait for their rows in ``language_mm_receiver.py``.
"""

from __future__ import annotations

import json
import logging

from sglang.srt.arg_groups.overrides import (
    declare_resolution,
    model_config_of,
    resolving_view,
)

logger = logging.getLogger(__name__)

LANGUAGE_ARCHITECTURE = "Qwen3MoeForCausalLM"
_SOURCE = "handle_encode_language_disaggregation"


def handle_encode_language_disaggregation(server_args) -> None:
    cfg = resolving_view(server_args)
    mode = cfg.disaggregation_mode
    flag = f"--disaggregation-mode {mode}"
    if cfg.encoder_only or cfg.language_only:
        other = "--encoder-only" if cfg.encoder_only else "--language-only"
        raise ValueError(
            f"{flag} cannot be combined with {other}: {other} selects upstream's encoder "
            f"disaggregation, a different protocol. Use one or the other."
        )
    if cfg.disaggregation_transfer_backend != "mooncake":
        raise ValueError(
            f"{flag} supports only --disaggregation-transfer-backend mooncake "
            f"(or mooncake_tcp), got {cfg.disaggregation_transfer_backend!r}"
        )
    if mode == "encode":
        _handle_encode(server_args, cfg, flag)
    else:
        _handle_language(server_args, cfg, flag)


def _handle_encode(server_args, cfg, flag: str) -> None:
    if cfg.speculative_algorithm is not None:
        raise ValueError(
            f"{flag} runs no language model, so speculative decoding "
            f"(--speculative-algorithm {cfg.speculative_algorithm}) cannot be used there"
        )
    _require_vision_config(server_args, flag)
    declare_resolution(server_args, _SOURCE, disable_overlap_schedule=True)


def _handle_language(server_args, cfg, flag: str) -> None:
    overrides = json.loads(cfg.json_model_override_args or "{}")
    if "architectures" not in overrides:
        overrides["architectures"] = [LANGUAGE_ARCHITECTURE]
        declare_resolution(
            server_args, _SOURCE, json_model_override_args=json.dumps(overrides)
        )
    _require_vision_config(server_args, flag)


def _require_vision_config(server_args, flag: str) -> None:
    hf_config = model_config_of(server_args).hf_config
    if getattr(hf_config, "vision_config", None) is None:
        raise ValueError(
            f"{flag} needs a vision-language checkpoint (a config with vision_config), but "
            f"{resolving_view(server_args).model_path} has none"
        )
