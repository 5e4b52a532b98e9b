"""The machine a run was measured on, as the reports name it: numbers mean little without it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    import torch  # here, not at the top: slow to import, and only the record asks

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
