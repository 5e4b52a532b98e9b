#!/bin/sh
# The images' entrypoint: `make serve`'s launcher, configured from the environment. It runs outside
# a container too, with the project installed (`make venv`) and its Python first on PATH or in PYTHON.
# Each variable is optional; unset, the launcher's default holds (those of `make serve`):
#   MODEL_DIR     checkpoint folder (the embedded tiny checkpoint, models/tiny-maverick)
#   PROFILE       server/profiles/NAME.json (cpu-tiny)
#   HTTP_PORT, GRPC_PORT, METRICS_PORT   (8000, 8001, 8002)
#   OPENAI_PORT   the OpenAI-compatible API beside Triton (9000; 0: none)
#   OPENAI_ALLOWED_IMAGE_HOSTS, OPENAI_ALLOW_HTTP_IMAGES, OPENAI_MAX_IMAGE_BYTES,
#   OPENAI_IMAGE_FETCH_TIMEOUT   which image URLs that API fetches (docs/api.md); it reads them from
#                 the environment it inherits, so nothing here passes them on
#   ENGINE_ARGS   "key=value ..." engine settings over the profile's
#   SERVING_NICE  how far the stubs step below the engine process in priority (10)
#   TRACE_FILE    Triton's per-request trace, written when the server stops
#   BUILD_DIR     a writable folder for the rendered model repository (one under build/)
#   ADMIN_KEY     Triton's admin APIs (repository control, trace, logging, shared memory) only with
#                 this key in an `admin-key` header; read by the launcher itself (never on a command line)
# Arguments go to the launcher after these (`python -m server.launch --help`).
set -eu
set -f  # ENGINE_ARGS is split into words below, never globbed
# exec: the launcher takes this shell's place (PID 1 in a container), so `docker stop`'s SIGTERM and
# Ctrl-C's SIGINT reach it, and it stops the server cleanly.
exec "${PYTHON:-python3}" -m server.launch \
    ${MODEL_DIR:+--model-dir "$MODEL_DIR"} \
    ${PROFILE:+--profile "$PROFILE"} \
    ${HTTP_PORT:+--http-port "$HTTP_PORT"} \
    ${GRPC_PORT:+--grpc-port "$GRPC_PORT"} \
    ${METRICS_PORT:+--metrics-port "$METRICS_PORT"} \
    ${OPENAI_PORT:+--openai-port "$OPENAI_PORT"} \
    ${SERVING_NICE:+--serving-nice "$SERVING_NICE"} \
    ${TRACE_FILE:+--trace-file "$TRACE_FILE"} \
    ${BUILD_DIR:+--build-dir "$BUILD_DIR"} \
    ${ENGINE_ARGS:+--engine $ENGINE_ARGS} \
    "$@"
