"""Count prompt tokens in the gateway, to refuse a prompt that cannot fit the model's context
before it costs an engine round trip, and to reserve tokens against tenant limits.

The count covers the message texts, not the chat template's few extra tokens: the engine's own
check stays authoritative for prompts right at the edge.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Short prompts are tokenized inline: a thread hop would cost more than the work.
INLINE_MAX_CHARS = 16_384


class TokenCounter:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> TokenCounter:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            logger.warning("no %s: prompt length is checked by the engine only", path)
            return cls(None)
        return cls(Tokenizer.from_file(str(path)))

    def _count(self, texts: list[str]) -> list[int]:
        assert self._tokenizer is not None
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    async def count(self, texts: list[str]) -> list[int] | None:
        """Tokens in each of `texts`, or None when no tokenizer is available here."""
        if self._tokenizer is None:
            return None
        if sum(len(t) for t in texts) <= INLINE_MAX_CHARS:
            return self._count(texts)
        return await asyncio.to_thread(self._count, texts)
