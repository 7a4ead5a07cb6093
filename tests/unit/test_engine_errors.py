"""What the engine says never reaches a caller unfiltered: its error statuses translated with
vLLM's own error bodies (shapes from vllm/entrypoints), and its model list read and judged."""

from __future__ import annotations

import json

import pytest

from server.engines.base import ServedModel, printable
from server.engines.monitor import check_served
from server.engines.openai_http import parse_model_list, translate_error_status
from server.errors import (
    ContextLengthError,
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
)
from server.settings import ModelSettings

DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
ENGINE_NAME = f"lg-{DIGEST}"
ADAPTER_DIR = f"/home/gw/.cache/loragate/store/blobs/{DIGEST}"
MODEL = ModelSettings(name="SmolLM2-135M-Instruct", max_model_len=2048)


def vllm_error(message: str, err_type: str, status: int, param: str | None = None) -> bytes:
    """vLLM's ErrorResponse (serve/engine/protocol.py): `code` is the HTTP status."""
    error = {"message": message, "type": err_type, "param": param, "code": status}
    return json.dumps({"error": error}).encode()


def test_a_404_never_passes_on_the_engines_alias_list() -> None:
    # serve/engine/serving.py, _check_model
    body = vllm_error(
        f"The model `{ENGINE_NAME}` does not exist. Valid aliases: SmolLM2-135M-Instruct, "
        f"lg-{'1' * 64}.",
        "NotFoundError",
        404,
        param="model",
    )
    error = translate_error_status(404, body)
    assert isinstance(error, ModelNotFoundError)
    assert error.code == "model_not_found" and error.param == "model"
    for engine_side in ("lg-", "Valid aliases", "SmolLM2", DIGEST):
        assert engine_side not in error.message


def test_a_context_length_400_keeps_its_message_as_context_length_exceeded() -> None:
    # renderers/params.py, _token_len_check (a VLLMValidationError: param is vLLM's own)
    message = (
        "This model's maximum context length is 2048 tokens. However, your prompt contains "
        "3001 input tokens, which exceeds this limit even without any output tokens. "
        "Please reduce the length of the input prompt."
    )
    body = vllm_error(message, "BadRequestError", 400, param="input_tokens")
    error = translate_error_status(400, body)
    assert isinstance(error, ContextLengthError)
    assert error.code == "context_length_exceeded"
    assert error.message == message
    assert error.param is None  # `input_tokens` is no field of our request


def test_the_other_context_length_message_is_recognised_too() -> None:
    # serve/utils/api_utils.py, get_max_tokens
    body = vllm_error(
        "Input length (3001) exceeds model's maximum context length (2048).",
        "BadRequestError",
        400,
    )
    assert isinstance(translate_error_status(400, body), ContextLengthError)


def test_a_400_naming_an_adapter_and_its_path_loses_both() -> None:
    # vllm/exceptions.py, LoRAAdapterNotFoundError
    body = vllm_error(
        f"Loading lora {ENGINE_NAME} failed: No adapter found for {ADAPTER_DIR}",
        "BadRequestError",
        400,
    )
    error = translate_error_status(400, body)
    assert type(error) is InvalidRequestError
    assert error.message == "Loading lora <adapter> failed: No adapter found for <path>"


def test_quoted_adapter_names_are_removed_with_their_quotes() -> None:
    body = vllm_error(
        f"The lora adapter '{ENGINE_NAME}' has already been loaded.", "BadRequestError", 400
    )
    assert translate_error_status(400, body).message == (
        "The lora adapter <adapter> has already been loaded."
    )


def test_field_names_and_fractions_are_not_mistaken_for_paths() -> None:
    message = "temperature must be in [0, 2], and top_p in (0, 1]: got 1/2 of max_tokens"
    body = vllm_error(message, "BadRequestError", 400, param="temperature")
    error = translate_error_status(400, body)
    assert error.message == message and error.param == "temperature"


def test_a_422_message_is_stripped_of_control_characters_and_bounded() -> None:
    body = vllm_error("bad\nvalue\x1b[31m" + "x" * 5000, "UnprocessableEntityError", 422)
    error = translate_error_status(422, body)
    assert isinstance(error, InvalidRequestError)
    assert "\n" not in error.message and "\x1b" not in error.message
    assert error.message.startswith("bad value [31m")
    assert len(error.message) <= 500


def test_a_param_that_is_not_a_field_name_is_dropped() -> None:
    body = vllm_error("bad", "BadRequestError", 400, param="x" * 100 + " \n<script>")
    assert translate_error_status(400, body).param is None


@pytest.mark.parametrize("content", [b"<html>Bad Request</html>", b"", b'{"error": "a string"}'])
def test_a_400_without_an_envelope_gets_our_message(content: bytes) -> None:
    error = translate_error_status(400, content)
    assert isinstance(error, InvalidRequestError)
    assert error.message == "the engine refused the request (400)"


def test_a_5xx_never_passes_on_the_engines_text() -> None:
    # openai/models/serving.py, load_lora_adapter: str(e) of whatever the worker raised
    body = vllm_error(
        f'Traceback (most recent call last):\n  File "/usr/lib/python3/vllm/lora.py" '
        f"loading {ENGINE_NAME} from {ADAPTER_DIR}",
        "InternalServerError",
        500,
    )
    error = translate_error_status(500, body)
    assert isinstance(error, EngineError)
    assert error.message == "the engine failed (500)"


def test_a_503_is_engine_unavailable_with_our_message() -> None:
    error = translate_error_status(
        503, vllm_error(f"{ADAPTER_DIR} busy", "ServiceUnavailable", 503)
    )
    assert isinstance(error, EngineUnavailableError)
    assert ADAPTER_DIR not in error.message


def test_printable_replaces_control_characters_and_cuts() -> None:
    assert printable("a\r\nb\x00c", 10) == "a b c"
    assert printable("abcdef", 4) == "abc…"


def models_body(*cards: dict[str, object]) -> bytes:
    return json.dumps({"object": "list", "data": list(cards)}).encode()


def test_the_model_list_reads_vllms_cards() -> None:
    # openai/models/serving.py, show_available_models: the base, then each adapter
    content = models_body(
        {"id": MODEL.name, "object": "model", "root": "/models/smol", "max_model_len": 2048},
        {"id": ENGINE_NAME, "object": "model", "root": ADAPTER_DIR, "parent": MODEL.name},
    )
    assert parse_model_list(content) == [
        ServedModel(MODEL.name, 2048, None),
        ServedModel(ENGINE_NAME, None, MODEL.name),
    ]


def test_odd_cards_are_skipped_and_odd_lengths_ignored() -> None:
    content = models_body(
        {"id": 7},
        {"object": "model"},
        {"id": "a", "max_model_len": True},
        {"id": "b", "max_model_len": -1},
    )
    assert parse_model_list(content) == [ServedModel("a"), ServedModel("b")]


@pytest.mark.parametrize("content", [b"not json", b"[]", b'{"data": {"id": "x"}}', b"{}"])
def test_a_model_list_that_is_no_list_is_an_engine_error(content: bytes) -> None:
    with pytest.raises(EngineError):
        parse_model_list(content)


def test_our_model_with_enough_context_or_none_reported_is_accepted() -> None:
    assert check_served([ServedModel(MODEL.name, 4096)], MODEL) is None
    assert check_served([ServedModel(MODEL.name, None)], MODEL) is None


def test_a_shorter_context_is_refused_with_both_lengths() -> None:
    reason = check_served([ServedModel(MODEL.name, 1024)], MODEL)
    assert reason is not None and reason.code == "engine_context_too_short"
    assert "1024" in reason.message and "2048" in reason.message


def test_a_mismatch_names_only_base_models_and_a_bounded_few() -> None:
    served = [
        ServedModel(ENGINE_NAME, None, "other"),  # an adapter, as vLLM lists it
        ServedModel(f"lg-{'2' * 64}"),  # an adapter name without its parent: still never shown
        ServedModel(MODEL.name, None, "other"),  # an adapter that took our name is not our base
        *(ServedModel(f"base-{i}\n", 2048) for i in range(7)),
    ]
    reason = check_served(served, MODEL)
    assert reason is not None and reason.code == "engine_model_mismatch"
    assert "lg-" not in reason.message and "\n" not in reason.message
    assert "`base-0`" in reason.message and "`base-4`" in reason.message
    assert "base-5" not in reason.message and "2 more" in reason.message


def test_an_engine_serving_no_base_model_says_so() -> None:
    reason = check_served([ServedModel(ENGINE_NAME, None, "x")], MODEL)
    assert reason is not None and "no base model" in reason.message
