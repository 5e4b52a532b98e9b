"""A bounded fuzz (hypothesis, derandomized: the same examples every run) of requests sent straight
to `maverick` and `postprocessing` and through the ensemble, on the shared `triton` server. Whatever
a request holds, it gets exactly one final answer (a response flagged final, or an error) and
nothing after it; the server keeps serving, the engine process is never restarted, and the KV
cache is empty afterwards. Every tensor has the dtype and shape the config declares: what Triton
itself refuses is not ours to fuzz (and in Triton 2.51 such a refusal on a gRPC stream keeps the
ensemble from unloading; see test_triton_rejections.py)."""

from __future__ import annotations

import dataclasses
import json
import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import scrape_metrics
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from client.llm import HttpClient, grpc_inputs
from maverick.serving.step_output import StepOutput

FUZZ = settings(
    derandomize=True,  # a fixed seed: CI runs the same examples every time
    database=None,
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ANSWER_S = 60  # a request without its final answer by then hangs
TILE = (3, 336, 336)


def _one_request(url: str, model: str, inputs: list) -> tuple[list, str | None]:
    """One request on its own gRPC stream: (its responses, its error message or None). Fails if no
    final answer comes, or anything comes after it."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    responses, error, ended = [], None, False
    try:
        client.async_stream_infer(model, inputs, request_id="fuzz", enable_empty_final_response=True)
        while True:
            try:
                result, error = got.get(timeout=ANSWER_S)
            except queue.Empty:
                pytest.fail(f"no final answer from {model} within {ANSWER_S} s")
            if error is not None:
                break
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        ended = True
    finally:
        # after the final answer: closes our side and waits until the server has closed its own,
        # so whatever it sent after the final answer is in the queue
        client.stop_stream(cancel_requests=not ended)
        client.close()
    assert got.empty(), f"{model} answered after its final answer"
    message = None if error is None else error.message()
    # what the examples met, for --hypothesis-show-statistics
    event("answered" if message is None else f"refused: {message[:110]}")
    return responses, message


def _tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array)
    return inp


# -- values ------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
small_counts = st.integers(-2, 6) | st.sampled_from([10**9, "4", 4.5, None, True, []])
nested = st.sampled_from([10, 1000, 100_000]).map(lambda depth: "[" * depth + "]" * depth)
texts = st.text(max_size=40) | st.sampled_from(["", " ", "<|image|>", "<|begin_of_text|>hi", "<|eot|>"])


def _sometimes_odd(valid: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value the server takes (so that requests get through to the engine), else any.
    (hypothesis favours small integers and the first strategy of a one_of: the odd one is 4.)"""
    return st.integers(0, 4).flatmap(lambda i: odd if i == 4 else valid)


@st.composite
def request_json(draw, num_tokens: int, num_images: int) -> bytes:
    """The `request` tensor: a valid one with some fields replaced, or anything else."""
    meta = {
        "sampling": {"max_tokens": 4, "temperature": 0.0},
        "options": {"stream": False, "flow_control": False},
        "num_tokens": num_tokens,
        "num_images": num_images,
    }
    sampling_keys = [
        "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
        "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "stop_token_ids",
        "bad_words", "bad_words_ids", "ignore_eos", "include_stop_str_in_output", "logprobs", "surprise",
        "return_context_logits", "return_generation_logits",
    ]  # fmt: skip
    option_keys = [
        "stream", "echo_text", "default_max_tokens", "flow_control", "return_num_input_tokens",
        "return_num_output_tokens", "surprise", "return_perf_metrics", "batch_index", "batch_size",
    ]  # fmt: skip
    for key in draw(st.lists(st.sampled_from(sampling_keys), max_size=4)):
        counts = key in ("max_tokens", "min_tokens")
        meta["sampling"][key] = draw(small_counts if counts else json_values)
    for key in draw(st.lists(st.sampled_from(option_keys), max_size=3)):
        meta["options"][key] = draw(json_values | st.booleans())
    for key in draw(st.lists(st.sampled_from(["num_tokens", "num_images"]), max_size=1)):
        meta[key] = draw(small_counts)
    kind = draw(
        _sometimes_odd(st.just("valid"), st.sampled_from(["mutated", "other json", "nested", "bytes"]))
    )
    if kind == "valid":
        meta["sampling"]["max_tokens"] = draw(st.integers(1, 6))
        meta["options"] = {"stream": draw(st.booleans()), "flow_control": draw(st.booleans())}
        return json.dumps(meta).encode()
    if kind == "mutated":
        return json.dumps(meta).encode()
    if kind == "other json":
        return json.dumps(draw(json_values)).encode()
    if kind == "nested":
        return draw(nested).encode()
    return draw(st.binary(max_size=20))


int32s = st.integers(-(2**31), 2**31 - 1)


@st.composite
def direct_inputs(draw) -> list:
    """A request straight to `maverick`: its four tensors, any of them odd, or an `abort`."""
    if draw(st.integers(0, 5)) == 0:
        handle = draw(st.binary(max_size=40) | texts.map(str.encode))
        inputs = [_tensor("abort", np.array([[handle]], dtype=object), "BYTES")]
        if draw(st.booleans()):
            inputs.append(_tensor("input_ids", np.array([[1, 2]], dtype=np.int32), "INT32"))
        return inputs
    ids = draw(
        _sometimes_odd(st.lists(st.integers(0, 4047), min_size=1, max_size=12), st.lists(int32s, max_size=4))
    )
    n_tiles = draw(st.integers(0, 2))
    tiles = draw(
        _sometimes_odd(st.just([n_tiles] if n_tiles else []), st.lists(st.integers(-3, 3), max_size=3))
    )
    fill = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))
    return [
        _tensor("input_ids", np.array([ids], dtype=np.int32).reshape(1, -1), "INT32"),
        _tensor("pixel_values", np.full((1, n_tiles, *TILE), fill, dtype=np.float32), "FP32"),
        _tensor("image_tiles", np.array([tiles], dtype=np.int32).reshape(1, -1), "INT32"),
        _tensor("request", np.array([[draw(request_json(len(ids), len(tiles)))]], dtype=object), "BYTES"),
    ]


@st.composite
def steps(draw) -> list:
    """A `step` for postprocessing: a valid one (maybe a heartbeat), cut short, or random bytes."""
    step = StepOutput(
        text=draw(st.binary(max_size=12)),
        token_ids=np.array(draw(st.lists(int32s, max_size=4)), dtype=np.int32),
        finish_reason=draw(st.sampled_from([b"", b"length", b"stop", b"abort", b"\xff"])),
        num_input_tokens=draw(st.integers(-5, 2**40)),
        log_probs=np.array(draw(st.lists(st.floats(width=32), max_size=4)), dtype=np.float32),
        abort_handle=draw(st.binary(max_size=8)),
        returns=draw(st.integers(-1, 16)),
        ack=(-1, draw(st.integers(-2, 5000)), draw(st.integers(0, 2**40))),  # no board: nobody's
        heartbeat=draw(st.booleans()),
        sequence_index=draw(st.integers(-3, 20)),
        cum_log_prob=draw(st.floats()),
    )
    k = draw(st.integers(0, 3))
    if k:  # top log-probs: a row per log-prob
        rows = (step.log_probs.size, k)
        step = dataclasses.replace(
            step,
            top_log_probs=np.array(
                draw(st.lists(st.floats(width=32), min_size=rows[0] * k, max_size=rows[0] * k)),
                dtype=np.float32,
            ).reshape(rows),
            top_log_prob_ids=np.array(
                draw(st.lists(int32s, min_size=rows[0] * k, max_size=rows[0] * k)), dtype=np.int32
            ).reshape(rows),
        )
    step = step.to_array()
    kind = draw(st.sampled_from(["valid", "cut", "bytes"]))
    if kind == "cut":
        step = step[:, : draw(st.integers(0, step.shape[1]))]
    elif kind == "bytes":
        step = np.frombuffer(draw(st.binary(max_size=120)), dtype=np.uint8).reshape(1, -1)
    return [_tensor("step", np.ascontiguousarray(step), "UINT8")]


@st.composite
def ensemble_fields(draw) -> dict:
    """Public inputs of the right types, with any values; a small max_tokens (every answer is short)."""
    fields: dict = {
        "max_tokens": draw(_sometimes_odd(st.integers(1, 6), st.integers(-2, 0) | st.just(10**7)))
    }
    prompt = draw(st.sampled_from(["text", "text", "text", "messages", "messages", "both", "neither"]))
    if prompt in ("text", "both"):
        fields["text_input"] = draw(
            _sometimes_odd(st.text(min_size=1, max_size=40), texts | st.binary(max_size=16))
        )
    if prompt in ("messages", "both"):
        turn = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=20)})
        odd_turn = st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "wizard"]), "content": json_values}
        )
        odd = st.lists(odd_turn, max_size=2).map(json.dumps) | nested | st.text(max_size=20)
        fields["messages"] = draw(_sometimes_odd(st.lists(turn, min_size=1, max_size=2).map(json.dumps), odd))
    floats = st.floats(width=32)

    def between(lo: float, hi: float) -> st.SearchStrategy:
        # not st.floats(lo, hi): hypothesis refuses bounds once a library in this process has
        # switched the FPU to flush denormals (-ffast-math)
        return st.integers(round(lo * 100), round(hi * 100)).map(lambda i: i / 100)

    optional = {
        "images": st.lists(st.binary(max_size=24), max_size=2),
        "system_prompt": texts,
        "apply_chat_template": st.booleans(),
        "min_tokens": _sometimes_odd(st.integers(0, 1), st.integers(-2, 8)),
        "stream": st.booleans(),
        "temperature": _sometimes_odd(between(0, 2), floats),
        "top_p": _sometimes_odd(between(0.05, 1), floats),
        "top_k": _sometimes_odd(st.integers(0, 50), int32s),
        "min_p": _sometimes_odd(between(0, 1), floats),
        "seed": st.integers(0, 2**64 - 1),
        "repetition_penalty": _sometimes_odd(between(0.5, 2), floats),
        "presence_penalty": _sometimes_odd(between(-2, 2), floats),
        "frequency_penalty": _sometimes_odd(between(-2, 2), floats),
        "stop_words": st.lists(texts, max_size=3),
        "bad_words": st.lists(texts, max_size=3),
        "end_id": _sometimes_odd(st.integers(0, 4047), int32s),
        "ignore_eos": st.booleans(),
        "include_stop_str_in_output": st.booleans(),
        "exclude_input_in_output": st.booleans(),
        "return_log_probs": st.booleans(),
        "return_num_input_tokens": st.booleans(),
        "return_num_output_tokens": st.booleans(),
        "top_log_probs": _sometimes_odd(st.integers(0, 5), int32s),
        "num_return_sequences": _sometimes_odd(st.integers(1, 3), int32s),
        "logit_bias": _sometimes_odd(
            st.dictionaries(st.integers(0, 5000).map(str), between(-100, 100), max_size=3).map(json.dumps),
            json_values.map(json.dumps) | texts,
        ),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=5, unique=True)):
        fields[name] = draw(optional[name])
    return fields


# -- the fuzz ----------------------------------------------------------------------------------------
def _engine(server) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, _, value in scrape_metrics(server.cfg.metrics_port):
        if name.startswith("maverick_"):
            out[name] = out.get(name, 0.0) + value
    return out


@pytest.fixture(scope="module")
def fuzzed(triton):
    """The server, checked after the module's fuzz: still serving, engine never restarted, idle."""
    restarts = _engine(triton).get("maverick_engine_restarts_total", 0.0)
    yield triton
    assert HttpClient(triton.http_url).generate(text="still serving?", max_tokens=2).num_output_tokens == 2
    deadline = time.monotonic() + 10
    while (m := _engine(triton))["maverick_kv_cache_blocks_used"] or m["maverick_num_requests_running"]:
        assert time.monotonic() < deadline, f"not idle after the fuzz: {m}"
        time.sleep(0.2)
    assert m.get("maverick_engine_restarts_total", 0.0) == restarts, "the fuzz killed the engine process"


def _direct(ids: list[int], tiles: list[int], n_tiles: int, request: bytes) -> list:
    return [
        _tensor("input_ids", np.array([ids], dtype=np.int32), "INT32"),
        _tensor("pixel_values", np.zeros((1, n_tiles, *TILE), dtype=np.float32), "FP32"),
        _tensor("image_tiles", np.array([tiles], dtype=np.int32).reshape(1, -1), "INT32"),
        _tensor("request", np.array([[request]], dtype=object), "BYTES"),
    ]


VALID_REQUEST = json.dumps({"sampling": {"max_tokens": 2}, "options": {}}).encode()


@FUZZ
@given(inputs=direct_inputs())
@example(inputs=_direct([1, 2], [], 0, b"[" * 100_000 + b"]" * 100_000))  # the two cases
@example(inputs=_direct([1, 2], [2, -1], 1, VALID_REQUEST))
def test_direct_requests_to_maverick_all_end(fuzzed, inputs):
    _one_request(fuzzed.grpc_url, "maverick", inputs)


@FUZZ
@given(inputs=steps())
def test_direct_requests_to_postprocessing_all_end(fuzzed, inputs):
    responses, error = _one_request(fuzzed.grpc_url, "postprocessing", inputs)
    assert error is not None or len(responses) == 1  # a heartbeat's answer: the final flag alone


@FUZZ
@given(fields=ensemble_fields())
@example(fields={"messages": "[" * 100_000 + "]" * 100_000, "max_tokens": 2})
def test_requests_through_the_ensemble_all_end(fuzzed, fields):
    _one_request(fuzzed.grpc_url, "ensemble", grpc_inputs(fields))
