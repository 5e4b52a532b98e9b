"""OpenAI's `logprobs` of a chat choice from the ensemble's log-prob outputs.

The ensemble sends token ids with their log-probs (`output_log_probs`, `output_top_log_probs`,
`output_top_log_prob_ids`); the token strings come from the checkpoint's own tokenizer, which this
server loads (`--tokenizer MODEL_DIR`; `make serve` passes its checkpoint): a few MiB once, where
sending strings through the ensemble would cost every streamed response a copy at each hop.

Each token of a choice becomes `{"token", "logprob", "bytes", "top_logprobs": [...]}`: `bytes` are
the token's own bytes (a byte-level BPE token may hold part of a UTF-8 character), `token` those
bytes as text (U+FFFD for a partial character), a special token its name. The log-probs are of the
model's raw distribution (before temperature, penalties and logit_bias), as vLLM returns them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from client.llm import Chunk
from maverick.tokenizer import Tokenizer


class TokenLogprobs:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._token = lru_cache(maxsize=1 << 16)(self._entry)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> TokenLogprobs:
        return cls(Tokenizer.from_dir(model_dir))

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def entry(self, token_id: int, logprob: float) -> dict:
        token, raw = self._token(int(token_id))
        return {"token": token, "logprob": float(logprob), "bytes": list(raw)}

    def content(self, d: Chunk) -> list[dict]:
        """The `logprobs.content` entries of a delta's tokens (top_logprobs [] when none was asked)."""
        top_ids, top_lps = d.top_log_prob_ids or [], d.top_log_probs or []
        out = []
        for i, (token_id, logprob) in enumerate(zip(d.token_ids, d.log_probs or [], strict=False)):
            top = zip(top_ids[i], top_lps[i], strict=True) if i < len(top_ids) else ()
            entry = self.entry(token_id, logprob)
            out.append({**entry, "top_logprobs": [self.entry(t, lp) for t, lp in top]})
        return out
