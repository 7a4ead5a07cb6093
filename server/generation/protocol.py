"""Wire models for the OpenAI API requests the gateway accepts: OpenAI's fields plus vLLM's
sampling and extra parameters (what vLLM 0.32's own request models accept), each bounded.

Unknown fields are refused (400 naming the field) rather than passed to the engine: only what is
validated here ever reaches it. Types are strict (`"8"` is not an integer, `1` not a boolean;
integers are still floats) and no float may be NaN or infinite, anywhere. Request-size bounds that
depend on settings live in `request_bounds.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Hard caps that no setting can lift: they bound parsing work before any limit is checked.
MAX_TEXT_CHARS = 1 << 20
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 64
MAX_ALLOWED_TOKEN_IDS = 4096
MAX_BAD_WORDS = 64
MAX_PATTERN_CHARS = 64 << 10  # a regex, grammar, structural tag or serialized JSON schema
MAX_CHOICES = 256
MAX_JSON_DEPTH = 32
MAX_JSON_NODES = 10_000
MAX_LOGPROBS = 20
INT64 = 2**63 - 1

# Union members are told apart by the JSON type the caller sent (`_json_kind`), so an error names
# the branch the caller meant; their tags (`<string>`, `<list>`, `<object>`) appear in pydantic's
# error locations and are stripped from `param` (server/errors.py).

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, Field(min_length=1, max_length=64)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


def _json_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "<string>"
    if isinstance(value, list):
        return "<list>"
    if isinstance(value, dict):
        return "<object>"
    return None


def _by_json_kind(what: str) -> Discriminator:
    """Choose a union member by the JSON type sent (tags `<string>`, `<list>`, `<object>`)."""
    return Discriminator(_json_kind, custom_error_type="invalid_type", custom_error_message=what)


def _bounded_json(value: Any) -> Any:
    """Free-form JSON (schemas, template kwargs): bounded in depth and size, floats finite."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_JSON_NODES or depth > MAX_JSON_DEPTH:
            raise PydanticCustomError(
                "too_long",
                "at most {nodes} JSON values, nested at most {depth} deep",
                {"nodes": MAX_JSON_NODES, "depth": MAX_JSON_DEPTH},
            )
        if isinstance(item, float) and not math.isfinite(item):
            raise PydanticCustomError("finite_number", "Input should be a finite number")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def _bounded_schema(value: dict[str, Any]) -> dict[str, Any]:
    _bounded_json(value)
    if len(json.dumps(value, separators=(",", ":"))) > MAX_PATTERN_CHARS:
        raise PydanticCustomError(
            "string_too_long", "a JSON schema of at most {n} characters", {"n": MAX_PATTERN_CHARS}
        )
    return value


JsonValue = Annotated[Any, AfterValidator(_bounded_json)]
JsonSchema = Annotated[dict[str, Any], AfterValidator(_bounded_schema)]
Pattern = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]


def refused(code: str, why: str, allowed: Callable[[Any], bool] = lambda v: v is None) -> Any:
    """A field accepted only with the values `allowed` passes; any other is a 400 `code`."""

    def check(value: Any) -> Any:
        if not allowed(value):
            raise PydanticCustomError(code, why)
        return value

    return BeforeValidator(check)


NO_TOOLS = refused(
    "tools_not_supported",
    "tool calling is not supported by this gateway: the engine runs without a tool-call parser",
)
# A caller-supplied Jinja template runs in the engine's process; vLLM refuses it too unless
# started with --trust-request-chat-template, which a multi-tenant engine must never be.
NO_CHAT_TEMPLATE = refused(
    "chat_template_not_allowed", "a request may not bring its own chat template"
)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


MEDIA_PARTS = frozenset(
    {"image_url", "input_image", "image_embeds", "input_audio", "audio_url", "video_url", "file"}
)


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


def _part_kind(value: Any) -> str:
    if isinstance(value, dict) and value.get("type") in MEDIA_PARTS:
        return "<object>"  # a media part: refused by its branch
    return "<list>"  # anything else is checked as a text part


# The served model reads text only; vLLM would refuse media for a text-only model as well.
MediaPart = Annotated[
    Any,
    refused(
        "unsupported_content_type",
        "only text content parts are supported: the served model is text-only",
        lambda v: False,
    ),
]
ContentPart = Annotated[
    Annotated[TextPart, Tag("<list>")] | Annotated[MediaPart, Tag("<object>")],
    Discriminator(_part_kind),
]


Content = Annotated[
    Annotated[Text, Tag("<string>")]
    | Annotated[list[ContentPart], Field(max_length=256), Tag("<list>")],
    _by_json_kind("must be a string or a list of content parts"),
]


class ChatMessage(StrictModel):
    role: Annotated[
        Literal["system", "developer", "user", "assistant"],
        refused(
            "tools_not_supported",
            "tool and function messages need tool calling, which this gateway does not support",
            lambda v: v not in ("tool", "function"),
        ),
    ]
    content: Content
    name: Name | None = None
    tool_calls: Annotated[Any, NO_TOOLS] = None
    tool_call_id: Annotated[Any, NO_TOOLS] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(StrictModel):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


SchemaOrText = Annotated[
    Annotated[Pattern, Tag("<string>")] | Annotated[JsonSchema, Tag("<object>")],
    _by_json_kind("must be a JSON schema or its text"),
]
Choices = Annotated[
    list[Annotated[str, Field(max_length=1024)]], Field(min_length=1, max_length=MAX_CHOICES)
]


class StructuredOutputs(StrictModel):
    """vLLM's `StructuredOutputsParams`: exactly one constraint, plus its options."""

    # `json` would shadow BaseModel.json, hence the alias.
    json_: SchemaOrText | None = Field(None, alias="json")
    regex: Pattern | None = None
    choice: Choices | None = None
    grammar: Pattern | None = None
    json_object: bool | None = None
    structural_tag: Pattern | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: Annotated[str, Field(max_length=256)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        kinds = ("json_", "regex", "choice", "grammar", "json_object", "structural_tag")
        if sum(getattr(self, k) is not None for k in kinds) != 1:
            raise PydanticCustomError(
                "invalid_value",
                "exactly one of json, regex, choice, grammar, json_object, structural_tag",
            )
        return self


class JsonSchemaFormat(StrictModel):
    name: Name
    description: Annotated[str, Field(max_length=4096)] | None = None
    # `schema` is OpenAI's name; it would shadow BaseModel.schema, hence the alias (as vLLM does).
    json_schema: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "missing_field", "type json_schema needs the json_schema field"
            )
        return self


Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
StopParam = Annotated[
    Annotated[Stop, Tag("<string>")] | Annotated[list[Stop], Field(max_length=64), Tag("<list>")],
    _by_json_kind("must be a string or a list of strings"),
]
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=MAX_LOGIT_BIAS),
]

# Accepted but never sent to the engine (see the fields).
NOT_FORWARDED = frozenset({"request_id", "priority", "use_beam_search"})


class SamplingFields(StrictModel):
    """Fields shared by chat and text completions: OpenAI's and vLLM's sampling parameters."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1000)] | None = None  # -1 and 0: no top-k
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopParam | None = None
    seed: Annotated[int, Field(ge=-INT64 - 1, le=INT64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    length_penalty: Annotated[float, Field(ge=-10, le=10)] | None = None
    logit_bias: LogitBias | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None  # <= max_tokens: request_bounds
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    allowed_token_ids: (
        Annotated[list[TokenId], Field(min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)] | None
    ) = None
    bad_words: Annotated[list[Stop], Field(max_length=MAX_BAD_WORDS)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # -1: truncate to the context length; the bounds count the truncated prompt.
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=1 << 20)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    # -1 (the whole vocabulary at every prompt position) is refused: an unbounded answer.
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None
    # Not forwarded: the engine's ids are shared by every tenant, two callers could collide.
    request_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # Only the default: one engine serves every tenant first come first served, and a caller's
    # priority would let it jump the others (vLLM refuses non-zero without priority scheduling).
    priority: Annotated[
        int,
        refused(
            "unsupported_parameter",
            "priority scheduling is not available: requests are served first come first served",
            lambda v: v is None or (type(v) is int and v == 0),
        ),
    ] = 0
    # Beam search multiplies one request's work by its width outside the tenant's token quota,
    # and vLLM cannot stream it.
    use_beam_search: Annotated[
        bool,
        refused(
            "unsupported_parameter",
            "beam search is not supported",
            lambda v: v is None or v is False,
        ),
    ] = False

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError(
                "invalid_value", "stream_options can only be set when stream is true"
            )
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def engine_body(self) -> dict[str, Any]:
        """What is forwarded: only the fields the caller set, as validated."""
        return self.model_dump(
            exclude_unset=True, exclude_none=True, by_alias=True, exclude=set(NOT_FORWARDED)
        )


TemplateKey = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
# The template's own inputs have their own fields (or are the engine's business); through
# chat_template_kwargs they would bypass those fields' checks (e.g. tools).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "chat_template", "tokenize", "conversation", "messages", "tools", "documents",
        "add_generation_prompt", "continue_final_message", "return_tensors", "return_dict",
        "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
    }
)  # fmt: skip


def _no_reserved_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    if reserved := sorted(RESERVED_TEMPLATE_KWARGS & value.keys()):
        raise PydanticCustomError(
            "invalid_value", "reserved chat template kwargs: {keys}", {"keys": ", ".join(reserved)}
        )
    return value


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=10_000)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None
    documents: (
        Annotated[
            list[Annotated[dict[Annotated[str, Field(max_length=64)], Text], Field(max_length=16)]],
            Field(max_length=64),
        ]
        | None
    ) = None
    chat_template: Annotated[Any, NO_CHAT_TEMPLATE] = None
    chat_template_kwargs: (
        Annotated[
            dict[TemplateKey, JsonValue],
            Field(max_length=32),
            AfterValidator(_no_reserved_kwargs),
        ]
        | None
    ) = None
    tools: Annotated[Any, NO_TOOLS] = None
    tool_choice: Annotated[Any, NO_TOOLS] = None
    parallel_tool_calls: Annotated[Any, NO_TOOLS] = None
    functions: Annotated[Any, NO_TOOLS] = None
    function_call: Annotated[Any, NO_TOOLS] = None

    @field_validator("continue_final_message")
    @classmethod
    def _not_both(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and info.data.get("add_generation_prompt"):
            raise PydanticCustomError(
                "invalid_value", "cannot be true together with add_generation_prompt"
            )
        return value

    def prompt_texts(self) -> list[str]:
        return [m.text() for m in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# vLLM also takes token ids as prompts; the bounds here count text, so they are not accepted.
Prompt = Annotated[
    Annotated[Text, Tag("<string>")]
    | Annotated[list[Text], Field(min_length=1, max_length=64), Tag("<list>")],
    _by_json_kind("must be a string or a list of strings"),
]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    add_special_tokens: bool | None = None
    # vLLM renders a suffix only for fill-in-the-middle models, and refuses it otherwise.
    suffix: Annotated[
        Any,
        refused("unsupported_parameter", "suffix needs a fill-in-the-middle model"),
    ] = None
    # Raw tensors from the caller (vLLM deserializes them with torch): never accepted.
    prompt_embeds: Annotated[
        Any, refused("unsupported_parameter", "prompt_embeds are not accepted")
    ] = None

    def prompt_texts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


GenerationRequest = ChatCompletionRequest | CompletionRequest


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None  # as vLLM's: clients (vLLM's benchmark) read data[0]["root"]
    parent: str | None = None  # an adapter's base model
    max_model_len: int | None = None
    # An adapter only a merged engine serves (DoRA, modules_to_save): 503 while none is up.
    # Not vLLM's.
    merge_only: bool | None = None

    @model_validator(mode="after")
    def _root_defaults_to_id(self) -> ModelCard:
        if self.root is None:
            self.root = self.id
        return self


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump_json(obj: Any) -> bytes:
    """A response body in the same compact form as FastAPI's JSONResponse."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
