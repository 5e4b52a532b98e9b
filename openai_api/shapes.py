"""What differs between OpenAI's chat completions and (legacy) completions answers; app.py builds
both from the same Triton stream, usage and SSE code with one of these."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Shape:
    id_prefix: str
    object: str  # the whole answer
    chunk_object: str  # one server-sent chunk
    chat: bool

    def message(self, text: str) -> dict:
        """A whole answer's choice, without index, logprobs and finish_reason."""
        return {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}

    def content(self, text: str) -> dict:
        """A chunk's choice carrying text."""
        return {"delta": {"content": text}} if self.chat else {"text": text}

    def opening(self) -> dict | None:
        """The chunk choice before any text (chat names the role first), or None."""
        return {"delta": {"role": "assistant", "content": ""}} if self.chat else None

    def logprobs(self, entries: list[dict], offset: int = 0) -> dict:
        """A choice's `logprobs` from its tokens' entries (logprobs.py); `offset`: the length of
        the choice's text before these tokens (completions' `text_offset` goes on from it)."""
        if self.chat:
            return {"content": entries, "refusal": None}
        # completions: the chosen token is always among its top_logprobs (up to logprobs + 1 there)
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                {**{t["token"]: t["logprob"] for t in e["top_logprobs"]}, e["token"]: e["logprob"]}
                for e in entries
            ],
            "text_offset": list(accumulate((len(e["token"]) for e in entries[:-1]), initial=offset))
            if entries
            else [],
        }

    def closing(self) -> dict:
        """The chunk choice that carries finish_reason."""
        return {"delta": {}} if self.chat else {"text": ""}


CHAT = Shape("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = Shape("cmpl-", "text_completion", "text_completion", chat=False)
