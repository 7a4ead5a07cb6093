"""Bounds on what one request may ask for: sampling counts, output length, prompt length
against the model's context. Raises 400s that name the offending field, each with its own code
(`too_many_choices`, `too_many_stop_sequences`, `too_many_messages`, `max_tokens_too_large`,
`min_tokens_too_large`, `context_length_exceeded`)."""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import ContextLengthError, InvalidRequestError
from server.generation.protocol import ChatCompletionRequest, GenerationRequest
from server.generation.token_count import TokenCounter
from server.settings import Settings

# Without a tokenizer, prompt tokens are estimated (for tenant token limits) at this many
# characters per token: English text averages about four.
CHARS_PER_TOKEN_ESTIMATE = 4


@dataclass(frozen=True)
class RequestBudget:
    max_tokens: int  # what the engine is asked for, per choice
    most_tokens: int  # the most the request can cost: prompts + every choice's max_tokens


class RequestBounds:
    def __init__(self, settings: Settings, token_counter: TokenCounter) -> None:
        self._limits = settings.limits
        self._context = settings.model.max_model_len
        self._tokens = token_counter

    async def check(self, request: GenerationRequest) -> RequestBudget:
        """Refuse what the limits do not allow; return the max_tokens to send and what the
        request may cost."""
        limits = self._limits
        is_chat = isinstance(request, ChatCompletionRequest)
        if (request.n or 1) > limits.max_n:
            raise InvalidRequestError(
                f"n must be at most {limits.max_n}", param="n", code="too_many_choices"
            )
        if len(request.stop_list()) > limits.max_stop:
            raise InvalidRequestError(
                f"at most {limits.max_stop} stop sequences",
                param="stop",
                code="too_many_stop_sequences",
            )
        if (
            isinstance(request, ChatCompletionRequest)
            and len(request.messages) > limits.max_messages
        ):
            raise InvalidRequestError(
                f"at most {limits.max_messages} messages",
                param="messages",
                code="too_many_messages",
            )
        param = "max_tokens"
        if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens:
            param = "max_completion_tokens"
        requested = request.requested_max_tokens()
        if requested is not None and requested > limits.max_tokens:
            raise InvalidRequestError(
                f"{param} must be at most {limits.max_tokens}",
                param=param,
                code="max_tokens_too_large",
            )
        max_tokens = requested or limits.default_max_tokens
        # Against the effective max_tokens: vLLM refuses min_tokens > max_tokens too, but only
        # after the default is applied it is known (and the caller should hear it from us).
        if request.min_tokens is not None and request.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be at most max_tokens ({max_tokens})",
                param="min_tokens",
                code="min_tokens_too_large",
            )
        texts = request.prompt_texts()
        counts = await self._tokens.count(texts)
        # Chat messages form one prompt; a list of completion prompts is a batch of prompts.
        prompt_tokens = (sum(counts) if is_chat else max(counts)) if counts else None
        if prompt_tokens is not None and (keep := request.truncate_prompt_tokens or 0) > 0:
            # The engine keeps only `keep` tokens of each prompt (-1: its own choice, unknown).
            prompt_tokens = min(prompt_tokens, keep)
        if prompt_tokens is not None and prompt_tokens + max_tokens > self._context:
            raise ContextLengthError(
                f"This model's maximum context length is {self._context} tokens; the prompt "
                f"has {prompt_tokens} and {max_tokens} more were asked for.",
                param="messages" if is_chat else "prompt",
            )
        if counts is None:
            counts = [len(t) // CHARS_PER_TOKEN_ESTIMATE + 1 for t in texts]
        choices = (request.n or 1) * (1 if is_chat else len(texts))
        return RequestBudget(max_tokens, sum(counts) + choices * max_tokens)
