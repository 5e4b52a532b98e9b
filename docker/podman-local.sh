#!/usr/bin/env bash
# Builds docker/Dockerfile.cpu with Podman and streams an answer from the image, on a machine that
# reaches no image registry, only Debian's and PyPI's: the base image is a Debian bookworm rootfs
# made with debootstrap (Python 3.11) and imported. Needs root and
# `apt-get install podman runc debootstrap`. Not run by CI: it takes minutes and root.
#   docker/podman-local.sh            # WORK, BASE_IMAGE, IMAGE, HTTP_PORT, GRPC_PORT, METRICS_PORT
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/maverick-podman}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-bookworm-python:latest}
IMAGE=${IMAGE:-localhost/maverick-triton:cpu}
HTTP_PORT=${HTTP_PORT:-18000} GRPC_PORT=${GRPC_PORT:-18001} METRICS_PORT=${METRICS_PORT:-18002}
mkdir -p "$WORK"

# Sandboxed hosts like ours: crun fails ("cgroups in hybrid mode not supported"), so runc; setting
# RLIMIT_NOFILE / RLIMIT_NPROC is not permitted, so no default ulimits; host networking only.
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

if ! podman image exists "$BASE_IMAGE"; then
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,libpython3.11,ca-certificates \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE_IMAGE"
fi

# download.pytorch.org is out of reach here: torch 2.14.1 comes from PyPI, whose Linux wheel is the
# CUDA 13.0 build (it runs on the CPU, with GBs of CUDA libraries). A proxy that re-signs TLS with a
# CA of the host's needs that CA in the build: the host's bundle and a pip.conf naming it are
# mounted for the build only, not copied into the image. --format docker keeps the HEALTHCHECK.
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$WORK/pip.conf"
time podman build --network host --format docker -f docker/Dockerfile.cpu \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -v "$WORK/pip.conf:/etc/pip.conf:ro" \
    --build-arg BASE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t "$IMAGE" .
podman image ls "$IMAGE"

cid=$(podman run -d --network host --init --shm-size=2g \
    -e HTTP_PORT="$HTTP_PORT" -e GRPC_PORT="$GRPC_PORT" -e METRICS_PORT="$METRICS_PORT" "$IMAGE")
trap 'podman rm -f "$cid" >/dev/null 2>&1 || true' EXIT
ready=
for _ in $(seq 180); do
    if curl -sf "localhost:$HTTP_PORT/v2/health/ready"; then ready=1 && break; fi
    [ "$(podman inspect -f '{{.State.Running}}' "$cid")" = true ] || break
    sleep 1
done
[ -n "$ready" ] || { podman logs "$cid" 2>&1 | tail -40; exit 1; }
# No systemd here to schedule the HEALTHCHECK: run it once by hand.
podman healthcheck run "$cid" && echo "HEALTHCHECK: healthy"
curl -sfN "localhost:$HTTP_PORT/v2/models/ensemble/generate_stream" \
    -d '{"text_input": "Tell me a story.", "apply_chat_template": true, "max_tokens": 16, "stream": true}'
podman exec "$cid" id
podman stop -t 30 "$cid"  # SIGTERM, as docker stop
echo "exit code after SIGTERM: $(podman inspect -f '{{.State.ExitCode}}' "$cid")"
