"""An OpenAI-compatible API server in front of the Triton `ensemble` (gRPC, streaming).

    python -m openai_api --triton-url localhost:8001 --port 9000

See docs/api.md, "OpenAI-compatible API (first increment)".
"""
