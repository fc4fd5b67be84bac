"""Start-up validation of ``--disaggregation-mode encode|language`` (patch 0007): wrong
combinations fail with a message naming the flag; right ones get the documented defaults.

Runs SGLang's real server-argument pipeline (``ServerArgs.resolve_once``) on tiny generated
checkpoints; no server is started.
"""

from __future__ import annotations

import json

import pytest
from epd_testbed.tiny_ckpt import TinyTextMoeSpec, TinyVLMoeSpec, ensure_checkpoint


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.fixture(scope="module")
def text_model() -> str:
    return str(ensure_checkpoint(TinyTextMoeSpec()))


def _resolve(model_path: str, **kwargs):
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=model_path, dtype="float32", **kwargs)
    server_args.resolve_once()
    return server_args, resolved_view(server_args)


@pytest.mark.parametrize(
    "mode, flag",
    [
        ("encode", "encoder_only"),
        ("encode", "language_only"),
        ("language", "language_only"),
        ("language", "encoder_only"),
    ],
)
def test_modes_refuse_upstream_epd_flags(vl_model, mode, flag) -> None:
    other = "--" + flag.replace("_", "-")
    with pytest.raises(
        ValueError,
        match=f"--disaggregation-mode {mode} cannot be combined with {other}",
    ):
        _resolve(vl_model, disaggregation_mode=mode, **{flag: True})


@pytest.mark.parametrize("mode", ["encode", "language"])
def test_only_mooncake_backend(vl_model, mode) -> None:
    with pytest.raises(
        ValueError,
        match=f"--disaggregation-mode {mode} supports only "
        r"--disaggregation-transfer-backend mooncake \(or mooncake_tcp\), got 'nixl'",
    ):
        _resolve(
            vl_model, disaggregation_mode=mode, disaggregation_transfer_backend="nixl"
        )


@pytest.mark.parametrize("mode", ["encode", "language"])
def test_checkpoint_without_vision_config(text_model, mode) -> None:
    with pytest.raises(
        ValueError,
        match=f"--disaggregation-mode {mode} needs a vision-language checkpoint",
    ):
        _resolve(text_model, disaggregation_mode=mode)


def test_no_speculative_decoding_on_encode(vl_model) -> None:
    with pytest.raises(
        ValueError,
        match="--disaggregation-mode encode runs no language model, so "
        r"speculative decoding \(--speculative-algorithm NGRAM\) cannot be used",
    ):
        _resolve(vl_model, disaggregation_mode="encode", speculative_algorithm="NGRAM")


def test_language_defaults(vl_model) -> None:
    """mooncake_tcp is accepted (as mooncake over TCP); the LLM class is built from the VL
    checkpoint; the language side gets the non-VLM memory budget."""
    from sglang.srt.configs.model_config import ModelConfig

    server_args, view = _resolve(
        vl_model,
        disaggregation_mode="language",
        disaggregation_transfer_backend="mooncake_tcp",
    )
    assert view.disaggregation_transfer_backend == "mooncake"
    assert json.loads(view.json_model_override_args) == {
        "architectures": ["Qwen3MoeForCausalLM"]
    }
    model_config = ModelConfig.from_server_args(server_args)
    assert model_config.hf_config.architectures == ["Qwen3MoeForCausalLM"]
    assert model_config.hf_config.vision_config is not None  # still the VL config


def test_language_keeps_a_user_architecture(vl_model) -> None:
    override = json.dumps(
        {"architectures": ["Qwen3MoeForCausalLM"], "max_position_embeddings": 4096}
    )
    _, view = _resolve(
        vl_model, disaggregation_mode="language", json_model_override_args=override
    )
    assert view.json_model_override_args == override


def test_encode_defaults(vl_model) -> None:
    """The encode side builds the VL class vision-only and runs its own loop (no overlap)."""
    from sglang.srt.configs.model_config import ModelConfig

    server_args, view = _resolve(vl_model, disaggregation_mode="encode")
    assert view.disable_overlap_schedule is True
    model_config = ModelConfig.from_server_args(server_args)
    assert model_config.hf_config.architectures == [
        "Qwen3VLMoeForConditionalGeneration"
    ]
    assert model_config.hf_config.encoder_only is True


def test_encode_tp_is_accepted(vl_model) -> None:
    """Encode ``--tp N``: rank 0 owns the transfer, every rank runs the TP vision tower."""
    _, view = _resolve(vl_model, disaggregation_mode="encode", tp_size=2)
    assert view.tp_size == 2
