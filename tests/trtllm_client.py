"""What TensorRT-LLM's `end_to_end_grpc_client.py` (tensorrtllm_backend, inflight_batcher_llm/client)
sends and reads, written here from its documented behaviour: the same inputs with the same types
and shapes for each of its flags, the same requested outputs, one gRPC stream per request, and
the same reading of each response (`text_output[0]`, `batch_index[0][0]`, ...). The tests run it
against our ensemble to show that a TensorRT-LLM user's client works unchanged.

Its behaviour, flag by flag: every request carries text_input [[prompt]], max_tokens [[n]] (INT32),
stream, beam_width (INT32) and temperature (FP32) [[v]], and exclude_input_in_output [[bool]] (its
default, false, is sent); num_return_sequences, end_id, pad_id only when given; stop/bad words and
embedding-bias words as [[w, ...]] (BYTES), the bias weights [[w, ...]] FP32; each return_* flag
as [[True]] (BOOL) when set; `--batch-inputs` stacks the one-prompt inputs along the first axis.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

PERF_OUTPUTS = (
    "kv_cache_alloc_new_blocks",
    "kv_cache_reused_blocks",
    "kv_cache_alloc_total_blocks",
    "arrival_time_ns",
    "first_scheduled_time_ns",
    "first_token_time_ns",
    "last_token_time_ns",
    "acceptance_rate",
    "total_accepted_draft_tokens",
    "total_draft_tokens",
)


@dataclass
class Flags:
    """The client's command-line flags (its defaults)."""

    output_len: int = 100
    streaming: bool = False  # -S
    num_return_sequences: int | None = None  # -n
    beam_width: int = 1
    temperature: float = 1.0
    stop_words: list[str] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    embedding_bias_words: list[str] | None = None
    embedding_bias_weights: list[float] | None = None
    return_log_probs: bool = False
    return_context_logits: bool = False
    return_generation_logits: bool = False
    return_perf_metrics: bool = False
    batch_inputs: bool = False
    end_id: int | None = None
    pad_id: int | None = None
    exclude_input_in_output: bool = False
    guided_decoding_guide_type: str | None = None
    guided_decoding_guide: str | None = None


@dataclass
class Run:
    texts: list[list[str]]  # [prompt][sequence], as the client assembles them
    results: list  # every InferResult, in arrival order
    errors: list[str]


def _one_prompt_inputs(prompt: str, f: Flags) -> dict[str, np.ndarray]:
    inputs = {
        "text_input": np.array([[prompt]], dtype=object),
        "max_tokens": np.ones((1, 1), dtype=np.int32) * f.output_len,
        "stream": np.array([[f.streaming]], dtype=bool),
        "beam_width": np.array([[f.beam_width]], dtype=np.int32),
        "temperature": np.array([[f.temperature]], dtype=np.float32),
    }
    if f.num_return_sequences is not None:
        inputs["num_return_sequences"] = np.array([[f.num_return_sequences]], dtype=np.int32)
    if f.bad_words:
        inputs["bad_words"] = np.array([f.bad_words], dtype=object)
    if f.stop_words:
        inputs["stop_words"] = np.array([f.stop_words], dtype=object)
    for name in ("return_log_probs", "return_context_logits", "return_generation_logits"):
        if getattr(f, name):
            inputs[name] = np.array([[True]], dtype=bool)
    if f.embedding_bias_words is not None:
        inputs["embedding_bias_words"] = np.array([f.embedding_bias_words], dtype=object)
        inputs["embedding_bias_weights"] = np.array([f.embedding_bias_weights], dtype=np.float32)
    if f.end_id is not None:
        inputs["end_id"] = np.array([[f.end_id]], dtype=np.int32)
    if f.pad_id is not None:
        inputs["pad_id"] = np.array([[f.pad_id]], dtype=np.int32)
    inputs["exclude_input_in_output"] = np.array([[f.exclude_input_in_output]], dtype=bool)
    if f.return_perf_metrics:
        inputs["return_perf_metrics"] = np.array([[True]], dtype=bool)
    if f.guided_decoding_guide_type is not None:
        inputs["guided_decoding_guide_type"] = np.array([[f.guided_decoding_guide_type]]).astype(object)
    if f.guided_decoding_guide is not None:
        inputs["guided_decoding_guide"] = np.array([[f.guided_decoding_guide]]).astype(object)
    return inputs


def _tensor(name: str, value: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, value.shape, np_to_triton_dtype(value.dtype))
    t.set_data_from_numpy(value)
    return t


def _requested(f: Flags) -> list[grpcclient.InferRequestedOutput]:
    names = ["text_output"]
    if f.return_log_probs:
        names += ["cum_log_probs", "output_log_probs"]
    if f.return_context_logits:
        names.append("context_logits")
    if f.return_generation_logits:
        names.append("generation_logits")
    if f.num_return_sequences is not None and f.num_return_sequences > 1:
        names.append("sequence_index")
    if f.batch_inputs:
        names.append("batch_index")
    if f.return_perf_metrics:
        names += PERF_OUTPUTS
    return [grpcclient.InferRequestedOutput(n) for n in names]


def run(url: str, prompts: list[str], f: Flags, model: str = "ensemble") -> Run:
    """The client's run_inference: one request per prompt, or one batched request."""
    per_prompt = [_one_prompt_inputs(p, f) for p in prompts]
    if f.batch_inputs:
        requests = [[_tensor(k, np.concatenate([d[k] for d in per_prompt])) for k in per_prompt[0]]]
    else:
        requests = [[_tensor(k, v) for k, v in d.items()] for d in per_prompt]
    n = f.beam_width if f.num_return_sequences is None else f.num_return_sequences
    texts: list[list[str]] = []
    results, errors = [], []
    client = grpcclient.InferenceServerClient(url)
    try:
        for inputs in requests:
            done: queue.Queue = queue.Queue()
            client.start_stream(callback=partial(lambda q, result, error: q.put(error or result), done))
            batch_size = inputs[0].shape()[0]
            client.async_stream_infer(model, inputs, outputs=_requested(f), request_id="")
            client.stop_stream()  # waits for the server to close the stream
            out = [[""] * n for _ in range(batch_size)]
            while not done.empty():
                result = done.get()
                if isinstance(result, InferenceServerException):
                    errors.append(result.message())
                    continue
                results.append(result)
                text = result.as_numpy("text_output")[0].decode("utf-8")
                b = result.as_numpy("batch_index")
                b = 0 if b is None else b[0][0]
                s = result.as_numpy("sequence_index")
                s = 0 if s is None else s[0][0]
                if f.streaming and f.beam_width == 1:
                    out[b][s] += text
                else:
                    out[b][s] = text
                if f.return_perf_metrics:  # read as the client does: each one present, [1, 1]
                    [result.as_numpy(name)[0][0] for name in PERF_OUTPUTS]
            texts += out
    finally:
        client.close()
    return Run(texts, results, errors)
