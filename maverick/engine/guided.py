"""Guided decoding: a request's output held to a grammar (JSON, a JSON schema, a regex, an EBNF
grammar or a structural tag) by xgrammar, which runs on CPUs and GPUs.

Each guided sequence has a `GrammarMatcher`. The token bitmasks of the guided sequences that will
sample in a step are filled on a worker thread while the model runs on a GPU (off the critical
path), and before the forward on the CPU (where a worker would only take cores from it). The
sampler sets every token a mask forbids to -inf after bias and penalties, and each sampled token
is fed back to its matcher. Requests without a guide get no mask: their rows,
the decode path (CUDA graphs, the compiled CPU step) and the batch are as without guided ones.

Grammars are compiled when a request arrives (on the caller's thread, not the engine loop) and
cached by xgrammar (the same schema twice compiles once); a guide that does not compile is the
request's error.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from maverick.engine.errors import RequestError

if TYPE_CHECKING:
    from maverick.engine.sequence import Sequence

# whitespace between two JSON elements at most (a newline and an indent): a model that would go
# on writing spaces or newlines must write the JSON on instead
MAX_JSON_WHITESPACE = 16
# xgrammar 0.2.9 writes the characters of a length-bounded JSON string (maxLength) as [^"\\\r\n],
# which lets control characters through, invalid unescaped in JSON; they are excluded here
_BOUNDED_CHARS = r"[^\"\\\r\n]"
_JSON_STRING_CHARS = r"[^\0-\x1f\"\\\r\n]"
_XGRAMMAR_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class Grammars:
    """The engine's grammar compiler (one per engine: the tokenizer's vocabulary, the model's
    vocabulary size) and the per-step bitmask filling."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, eos_ids: frozenset[int], overlap: bool):
        self.tokenizer_dir, self.vocab_size, self.eos_ids = str(tokenizer_dir), vocab_size, sorted(eos_ids)
        self._compiler = None
        self._lock = threading.Lock()  # the compiler is built once, by the first guided request
        self._pool: ThreadPoolExecutor | None = None
        # fill the masks on a worker thread while the forward runs: where the forward runs on a
        # GPU; on the CPU the forward's threads have the cores, and a worker only competes with
        # them (scripts/bench_guided.py measures both), so the masks are filled before it
        self.overlap = overlap

    def _xgrammar(self):
        try:
            import xgrammar
        except ImportError:
            raise RequestError(
                "guided decoding needs the xgrammar package, which this server lacks"
            ) from None
        return xgrammar

    @property
    def compiler(self):
        with self._lock:
            return self._compiler or self._build_compiler()

    def _build_compiler(self):
        xgr = self._xgrammar()
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=str(Path(self.tokenizer_dir) / "tokenizer.json"))
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def compile(self, kind: str, guide: str):
        """The compiled grammar of a guide (xgrammar caches them); RequestError if it is invalid."""
        compiler = self.compiler
        try:
            if kind in ("json", "json_schema"):  # json without a guide: any JSON value
                json.loads(guide or "{}")  # a clear message for text that is not JSON at all
                grammar = self._xgrammar().Grammar.from_json_schema(
                    guide or "{}", max_whitespace_cnt=MAX_JSON_WHITESPACE
                )
                return compiler.compile_grammar(str(grammar).replace(_BOUNDED_CHARS, _JSON_STRING_CHARS))
            if kind == "regex":
                return compiler.compile_regex(guide)
            if kind == "ebnf_grammar":
                return compiler.compile_grammar(guide)
            tag = json.loads(guide)
            if isinstance(tag, dict) and "structures" in tag:  # TensorRT-LLM's: structures and triggers
                xgr = self._xgrammar()
                items = [
                    xgr.StructuralTagItem(begin=s["begin"], schema=s["schema"], end=s["end"])
                    for s in tag["structures"]
                ]
                return compiler.compile_structural_tag(items, tag.get("triggers", []))
            return compiler.compile_structural_tag(guide)  # xgrammar's own, {"type": "structural_tag", ...}
        except json.JSONDecodeError as e:
            raise RequestError(f"guided_decoding_guide: the {kind} guide is not valid JSON: {e}") from None
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError / its own
            message = _XGRAMMAR_NOISE.sub(
                "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            )
            raise RequestError(f"guided_decoding_guide: not a valid {kind}: {message}") from None

    def matcher(self, compiled, stop_ids: list[int]):
        """A matcher for one sequence; the grammar's end admits the request's own stop tokens."""
        return self._xgrammar().GrammarMatcher(compiled, override_stop_tokens=list(stop_ids) or None)

    # -- per step --------------------------------------------------------------------------------
    def start_masks(self, seqs: list[Sequence]) -> Future | None:
        """Fill the bitmasks of these guided sequences, [G, words] int32: on a worker thread with
        `overlap`, else now."""
        if not seqs:
            return None
        if not self.overlap:
            done: Future = Future()
            done.set_result(self._fill([seq.grammar for seq in seqs]))
            return done
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, "maverick-grammar")
        return self._pool.submit(self._fill, [seq.grammar for seq in seqs])

    def _fill(self, matchers: list) -> torch.Tensor:
        xgr = self._xgrammar()
        masks = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(masks, i)
        return masks

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, every token of logits[rows] that xgrammar's packed bitmask
    [len(rows), ceil(V / 32)] int32 forbids (xgrammar's kernel on a GPU, its loop on the CPU)."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
