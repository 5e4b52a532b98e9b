"""The model repository's configs, read the way Triton reads them (its ModelConfig protobuf)."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
CONFIGS = {path.parent.name: path for path in sorted(REPOSITORY.glob("*/config.pbtxt"))}


def load(name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(CONFIGS[name].read_text(), model_config_pb2.ModelConfig())


def test_every_config_parses_as_triton_model_config():
    assert set(CONFIGS) == {"ensemble", "preprocessing", "maverick", "postprocessing"}
    for name in CONFIGS:
        assert load(name).name == name


def test_which_models_batch_dynamically():
    # postprocessing must not: its batcher would drop a cancelled ensemble's requests before
    # execute(), and seeing them is how cancellation reaches the engine (its config.pbtxt)
    batched = {name for name in CONFIGS if load(name).HasField("dynamic_batching")}
    assert batched == {"preprocessing", "maverick"}


@pytest.mark.parametrize("name", ["preprocessing", "maverick"])
def test_dynamic_batchers_prefetch(name):
    """Triton's batcher prefetches payloads only when its queue has no policy (PriorityQueue in
    Triton core's scheduler_utils.cc). Without prefetching it waits for a free instance on a
    condition variable whose wake-up it can miss, for up to 500 ms (docs/performance.md); without
    the policy the queue stays bounded by the engine's max_num_waiting."""
    batching = load(name).dynamic_batching
    policy = batching.default_queue_policy
    assert batching.priority_levels == 0
    assert policy.max_queue_size == 0
    assert policy.default_timeout_microseconds == 0
    assert not policy.allow_timeout_override
