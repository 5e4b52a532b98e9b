"""An OpenAI-compatible API server in front of the Triton `ensemble` (gRPC, streaming).

    python -m openai_api --triton-url localhost:8001 --port 9000

Modules: `protocol` (OpenAI bodies -> ensemble inputs), `triton` (one gRPC stream per request),
`app` (HTTP, JSON and server-sent events), `errors` (OpenAI's error shape), `tool_calls` (Llama 4's
tool calls in an answer -> OpenAI's tool_calls), `shapes` (chat vs legacy completions answers),
`images` (image URLs from allowed hosts), `metrics` (this server's /metrics). See docs/api.md.
"""
