"""TensorRT-LLM's ensemble interface, whole: every tensor of its ensemble config is in ours with the
same type and dims, and what its own gRPC client sends (tests/trtllm_client.py) runs against a real
tritonserver with each of the client's flags: names, types and shapes of the outputs as
TensorRT-LLM gives them, answers equal to the engine's own, log-probs and logits equal to the
engine's and to transformers' fp32 logits, batch and sequence indices right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from trtllm_client import PERF_OUTPUTS, Flags, run

from maverick.engine.llm_engine import LLMEngine
from maverick.serving.engine_args import engine_config
from maverick.serving.model_dir import generation_defaults
from maverick.serving.request import fit_max_tokens, numpy_inputs, parse_request
from maverick.tokenizer import Tokenizer
from server.launch import REPOSITORY, engine_parameters

# NVIDIA/TensorRT-LLM, triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt (commit
# 2a9abd95): (name, data type, dims) of every input and output (its config lists
# kv_cache_alloc_total_blocks twice; its logits type is a template parameter, TYPE_FP32 here)
TRTLLM_INPUTS = [
    ("text_input", "TYPE_STRING", [1]),
    ("decoder_text_input", "TYPE_STRING", [1]),
    ("max_tokens", "TYPE_INT32", [1]),
    ("num_return_sequences", "TYPE_INT32", [1]),
    ("bad_words", "TYPE_STRING", [-1]),
    ("stop_words", "TYPE_STRING", [-1]),
    ("exclude_input_in_output", "TYPE_BOOL", [1]),
    ("end_id", "TYPE_INT32", [1]),
    ("pad_id", "TYPE_INT32", [1]),
    ("top_k", "TYPE_INT32", [1]),
    ("top_p", "TYPE_FP32", [1]),
    ("temperature", "TYPE_FP32", [1]),
    ("length_penalty", "TYPE_FP32", [1]),
    ("repetition_penalty", "TYPE_FP32", [1]),
    ("min_tokens", "TYPE_INT32", [1]),
    ("presence_penalty", "TYPE_FP32", [1]),
    ("frequency_penalty", "TYPE_FP32", [1]),
    ("seed", "TYPE_UINT64", [1]),
    ("return_log_probs", "TYPE_BOOL", [1]),
    ("return_context_logits", "TYPE_BOOL", [1]),
    ("return_generation_logits", "TYPE_BOOL", [1]),
    ("return_perf_metrics", "TYPE_BOOL", [1]),
    ("return_num_input_tokens", "TYPE_BOOL", [1]),
    ("return_num_output_tokens", "TYPE_BOOL", [1]),
    ("beam_width", "TYPE_INT32", [1]),
    ("stream", "TYPE_BOOL", [1]),
    ("prompt_embedding_table", "TYPE_FP16", [-1, -1]),
    ("prompt_table_extra_id", "TYPE_UINT64", [1]),
    ("prompt_vocab_size", "TYPE_INT32", [1]),
    ("embedding_bias_words", "TYPE_STRING", [-1]),
    ("embedding_bias_weights", "TYPE_FP32", [-1]),
    ("lora_task_id", "TYPE_UINT64", [1]),
    ("lora_weights", "TYPE_FP16", [-1, -1]),
    ("lora_config", "TYPE_INT32", [-1, 3]),
    ("guided_decoding_guide_type", "TYPE_STRING", [1]),
    ("guided_decoding_guide", "TYPE_STRING", [1]),
]
TRTLLM_OUTPUTS = [
    ("text_output", "TYPE_STRING", [-1]),
    ("cum_log_probs", "TYPE_FP32", [-1]),
    ("output_log_probs", "TYPE_FP32", [-1, -1]),
    ("context_logits", "TYPE_FP32", [-1, -1]),
    ("generation_logits", "TYPE_FP32", [-1, -1, -1]),
    ("batch_index", "TYPE_INT32", [1]),
    ("sequence_index", "TYPE_INT32", [1]),
    ("kv_cache_alloc_new_blocks", "TYPE_INT32", [1]),
    ("kv_cache_reused_blocks", "TYPE_INT32", [1]),
    ("kv_cache_alloc_total_blocks", "TYPE_INT32", [1]),
    ("arrival_time_ns", "TYPE_INT64", [1]),
    ("first_scheduled_time_ns", "TYPE_INT64", [1]),
    ("first_token_time_ns", "TYPE_INT64", [1]),
    ("last_token_time_ns", "TYPE_INT64", [1]),
    ("acceptance_rate", "TYPE_FP32", [1]),
    ("total_accepted_draft_tokens", "TYPE_INT32", [1]),
    ("total_draft_tokens", "TYPE_INT32", [1]),
    ("num_input_tokens", "TYPE_INT32", [1]),
    ("num_output_tokens", "TYPE_INT32", [1]),
]
CONFIG = Path(__file__).resolve().parents[1] / "model_repository" / "ensemble" / "config.pbtxt"
PROMPTS = ["The quick brown fox", "Once upon a time there was", "Rivers of the world:"]


def _tensors(entries) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in entries}


def test_every_trtllm_ensemble_tensor_is_ours_with_its_type_and_dims():
    config = text_format.Parse(CONFIG.read_text(), model_config_pb2.ModelConfig())
    inputs, outputs = _tensors(config.input), _tensors(config.output)
    assert {n: inputs.get(n) for n, *_ in TRTLLM_INPUTS} == {n: (t, d) for n, t, d in TRTLLM_INPUTS}
    assert {n: outputs.get(n) for n, *_ in TRTLLM_OUTPUTS} == {n: (t, d) for n, t, d in TRTLLM_OUTPUTS}
    # theirs requires text_input and max_tokens; ours accepts them optional (messages, defaults)
    assert all(i.optional for i in config.input)


@pytest.fixture(scope="module")
def engine_answer(tiny_ckpt):
    """The engine alone, configured as the served `maverick` model: (ids, text, outputs) of a request."""
    engine = LLMEngine(
        engine_config(engine_parameters(tiny_ckpt, {"cpu_threads": "none"}), REPOSITORY.parent)
    )
    tokenizer = Tokenizer.from_dir(tiny_ckpt)
    defaults = generation_defaults(tiny_ckpt)

    def answer(**fields):
        req = fit_max_tokens(parse_request(numpy_inputs(fields), tokenizer, defaults), engine.max_model_len)
        engine.add_request("direct", req.prompt, req.params)
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        return req.prompt.token_ids, outs

    answer.model_dir = tiny_ckpt
    return answer


def _greedy(**kw) -> Flags:
    return Flags(output_len=12, temperature=0.0, **kw)


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_default_flags_and_batch_inputs(triton, engine_answer, streaming):
    """The client's defaults (beam_width 1 and exclude_input_in_output false sent with every
    request), one request per prompt and the three prompts in one batched request: every run
    completes with the engine's own answers, each tagged with its batch index."""
    want = []
    for p in PROMPTS:
        _, outs = engine_answer(text_input=p, max_tokens=12, temperature=0.0)
        want.append("".join(o.text for o in outs))
    # exclude_input_in_output false: the prompt first, not streamed (streamed, never: its check
    # --check-outputs expects exactly this)
    echoed = [p + w for p, w in zip(PROMPTS, want, strict=True)] if not streaming else want
    single = run(triton.grpc_url, PROMPTS, _greedy(streaming=streaming))
    assert not single.errors and single.texts == [[t] for t in echoed]
    batched = run(triton.grpc_url, PROMPTS, _greedy(streaming=streaming, batch_inputs=True))
    assert not batched.errors and batched.texts == [[t] for t in echoed]
    for r in batched.results:
        assert r.as_numpy("text_output").shape == (1,) and r.as_numpy("batch_index").shape == (1, 1)
    assert {int(r.as_numpy("batch_index")[0][0]) for r in batched.results} == {0, 1, 2}
    assert all(r.as_numpy("batch_index") is None for r in single.results)
    excluded = run(triton.grpc_url, PROMPTS[:1], _greedy(streaming=streaming, exclude_input_in_output=True))
    assert excluded.texts == [[want[0]]]


def test_num_return_sequences_with_a_batch(triton):
    """-n 2 with --batch-inputs, not streamed: one response per prompt and sequence (3 × 2), each
    tagged with both indices."""
    f = Flags(output_len=8, num_return_sequences=2, batch_inputs=True, exclude_input_in_output=True)
    got = run(triton.grpc_url, PROMPTS, f)
    assert not got.errors and len(got.results) == 6 and [len(row) for row in got.texts] == [2, 2, 2]
    tags = [
        (int(r.as_numpy("batch_index")[0][0]), int(r.as_numpy("sequence_index")[0][0])) for r in got.results
    ]
    assert sorted(tags) == [(b, s) for b in range(3) for s in range(2)]


def test_log_probs_in_trtllm_dims_equal_the_engines(triton, engine_answer):
    for streaming in (False, True):
        got = run(triton.grpc_url, PROMPTS[:1], _greedy(streaming=streaming, return_log_probs=True,
                                                         exclude_input_in_output=True))  # fmt: skip
        assert not got.errors
        _, outs = engine_answer(text_input=PROMPTS[0], max_tokens=12, temperature=0.0, return_log_probs=True)
        lps = np.concatenate([r.as_numpy("output_log_probs") for r in got.results], axis=2)
        assert all(r.as_numpy("output_log_probs").shape[:2] == (1, 1) for r in got.results)
        np.testing.assert_allclose(lps[0, 0], [lp for o in outs for lp in o.logprobs], atol=1e-5, rtol=0)
        cum = got.results[-1].as_numpy("cum_log_probs")
        assert cum.shape == (1, 1) and cum.dtype == np.float32
        assert cum[0, 0] == pytest.approx(outs[-1].cumulative_logprob, abs=1e-4)


def test_context_and_generation_logits_equal_transformers(triton, reference, tiny_ckpt):
    tokenizer = Tokenizer.from_dir(tiny_ckpt)
    for streaming in (False, True):
        f = _greedy(streaming=streaming, return_context_logits=True, return_generation_logits=True,
                    exclude_input_in_output=True)  # fmt: skip
        got = run(triton.grpc_url, PROMPTS[:1], f)
        assert not got.errors
        context = [
            r.as_numpy("context_logits") for r in got.results if r.as_numpy("context_logits") is not None
        ]
        assert len(context) == 1 and context[0].dtype == np.float32
        prompt = tokenizer.encode(PROMPTS[0], add_bos=True)
        gen = [r.as_numpy("generation_logits") for r in got.results]
        # TensorRT-LLM's layouts: streamed [1, tokens, beams, vocab], whole [1, beams, tokens, vocab]
        gen = np.concatenate([g[0, :, 0] for g in gen]) if streaming else gen[-1][0, 0]
        ids = [int(t) for t in np.argmax(gen, axis=-1)]  # greedy: each step's argmax
        with torch.no_grad():
            oracle = reference(input_ids=torch.tensor([prompt + ids])).logits[0].float().numpy()
        assert context[0].shape == (1, len(prompt), oracle.shape[-1])
        np.testing.assert_allclose(context[0][0], oracle[: len(prompt)], atol=1e-4, rtol=0)
        np.testing.assert_allclose(gen, oracle[len(prompt) - 1 : -1], atol=1e-4, rtol=0)
        assert len(ids) == 12


def test_perf_metrics_in_every_response(triton):
    for streaming in (False, True):
        got = run(triton.grpc_url, PROMPTS[2:], _greedy(streaming=streaming, return_perf_metrics=True))
        assert not got.errors and got.results
        for r in got.results:
            values = {n: r.as_numpy(n) for n in PERF_OUTPUTS}
            assert all(v.shape == (1, 1) for v in values.values())
            assert (
                values["arrival_time_ns"].dtype == np.int64
                and values["kv_cache_reused_blocks"].dtype == np.int32
            )
            v = {n: a[0, 0] for n, a in values.items()}
            assert v["arrival_time_ns"] <= v["first_scheduled_time_ns"] <= v["first_token_time_ns"]
            assert v["first_token_time_ns"] <= v["last_token_time_ns"]
            assert v["kv_cache_alloc_new_blocks"] >= 1 and v["total_draft_tokens"] == 0


@pytest.mark.parametrize("kind", ["stop_words", "bad_words", "end_id+pad_id", "embedding_bias"])
def test_word_lists_end_pad_and_embedding_bias_give_the_engines_answer(triton, engine_answer, kind):
    """Each flag, set so that it changes the plain greedy answer, gives the engine's own answer for
    the same inputs."""
    _, plain = engine_answer(text_input=PROMPTS[1], max_tokens=12, temperature=0.0)
    text, ids = "".join(o.text for o in plain), [t for o in plain for t in o.token_ids]
    assert text.strip() and len(set(ids)) > 3
    flags = {
        "stop_words": dict(stop_words=[text.strip()[-1]]),
        "bad_words": dict(bad_words=[text.split()[0]]),
        "end_id+pad_id": dict(end_id=ids[2], pad_id=0),
        "embedding_bias": dict(embedding_bias_words=["zebra", "moon"], embedding_bias_weights=[30.0, -5.0]),
    }[kind]
    fields = {k: v for k, v in flags.items() if k != "pad_id"}  # pad_id changes nothing
    if "embedding_bias_weights" in fields:
        fields["embedding_bias_weights"] = np.array(fields["embedding_bias_weights"], np.float32)
    _, outs = engine_answer(text_input=PROMPTS[1], max_tokens=12, temperature=0.0, **fields)
    want = "".join(o.text for o in outs)
    assert [t for o in outs for t in o.token_ids] != ids  # the flag matters here
    got = run(triton.grpc_url, PROMPTS[1:2], _greedy(exclude_input_in_output=True, **flags))
    assert not got.errors and got.texts == [[want]]
    if kind == "embedding_bias":  # +30 on each token of "zebra" (and BOS): greedy writes only those
        zebra = set(Tokenizer.from_dir(engine_answer.model_dir).encode("zebra", add_bos=True))
        assert {t for o in outs for t in o.token_ids} <= zebra


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(beam_width=2), "beam_width must be 1"),
        (dict(embedding_bias_words=["a", "b"], embedding_bias_weights=[1.0]), "2 words but"),
        (dict(pad_id=10**6), "pad_id must be a token id"),
    ],
)
def test_what_does_not_apply_is_refused_by_name(triton, flags, message):
    got = run(triton.grpc_url, PROMPTS[:1], _greedy(**flags))
    assert len(got.errors) == 1 and message in got.errors[0] and not got.results


@pytest.mark.parametrize(
    "name, value, reason",
    [
        ("decoder_text_input", np.array([["x"]], dtype=object), "encoder-decoder"),
        ("prompt_embedding_table", np.zeros((1, 2, 4), np.float16), "prompt tuning"),
        ("prompt_table_extra_id", np.ones((1, 1), np.uint64), "prompt tuning"),
        ("prompt_vocab_size", np.full((1, 1), 4, np.int32), "prompt tuning"),
        ("lora_task_id", np.ones((1, 1), np.uint64), "LoRA"),
        ("lora_weights", np.zeros((1, 2, 4), np.float16), "LoRA"),
        ("lora_config", np.zeros((1, 2, 3), np.int32), "LoRA"),
    ],
)
def test_inputs_for_other_models_are_refused_by_name(triton, name, value, reason):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from client.llm import GrpcClient, ServerError

    inputs = []
    for n, v in (("text_input", np.array([["hi"]], dtype=object)), (name, value)):
        t = grpcclient.InferInput(n, v.shape, np_to_triton_dtype(v.dtype))
        t.set_data_from_numpy(v)
        inputs.append(t)
    with GrpcClient(triton.grpc_url) as client, pytest.raises(ServerError) as err:
        list(client.stream_inputs(inputs))
    assert name in err.value.message and reason in err.value.message


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_guided_decoding_json_and_json_schema(triton, streaming):
    """`--guided-decoding-guide-type json` (any JSON) and json_schema with its guide: the tiny
    model's gibberish parses, and validates against the schema."""
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "days": {"type": "integer", "maximum": 9},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    for kind, guide in (("json", None), ("json_schema", json.dumps(schema))):
        flags = Flags(output_len=256, temperature=0.0, streaming=streaming, exclude_input_in_output=True,
                      guided_decoding_guide_type=kind, guided_decoding_guide=guide)  # fmt: skip
        got = run(triton.grpc_url, PROMPTS[:2], flags)
        assert not got.errors and len(got.texts) == 2
        for (text,) in got.texts:
            value = json.loads(text)
            if kind == "json_schema":
                jsonschema.validate(value, schema)


@pytest.mark.parametrize(
    "kind, guide, message",
    [
        ("xml", "<a/>", "guided_decoding_guide_type must be one of json, json_schema, regex"),
        ("regex", None, "guided_decoding_guide is required"),
        ("regex", "(unclosed", "not a valid regex"),
    ],
)
def test_a_bad_guide_is_refused_clearly(triton, kind, guide, message):
    flags = _greedy(guided_decoding_guide_type=kind, guided_decoding_guide=guide)
    got = run(triton.grpc_url, PROMPTS[:1], flags)
    assert len(got.errors) == 1 and message in got.errors[0] and not got.results
