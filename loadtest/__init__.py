"""Load tests for the `ensemble` model (or any Triton server with the TensorRT-LLM tensor names):
Locust users over gRPC streaming and HTTP /generate_stream, LLM metrics per request, a
concurrency sweep, pass/fail thresholds; and the same workload run against the engine directly.

    python -m loadtest --help                 # run one against a running server (`make loadtest`)
    python -m loadtest.engine_direct --help   # the same workload, the engine in-process
    python -m loadtest.record --help          # docs/performance.md's record: both, side by side
"""
