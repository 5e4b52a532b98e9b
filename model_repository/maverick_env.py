"""Imported first by every model.py here: lets the Python backend's stub see the project's
environment. The stub embeds its interpreter in isolated mode (PYTHONPATH is ignored), so the
launcher passes the venv's site-packages in MAVERICK_SITE_PACKAGES and they go in front of the
interpreter's own (whose numpy may be another major version). Unset (in the NGC image, where the
packages are installed into the system Python) this does nothing."""

import os
import site
import sys

_dirs = [d for d in os.environ.get("MAVERICK_SITE_PACKAGES", "").split(os.pathsep) if d]
if _dirs:
    _system = set(site.getsitepackages()) | {site.getusersitepackages()}
    sys.path[:] = [p for p in sys.path if p not in _system]  # the stdlib and the model folders stay
    for _d in _dirs:
        site.addsitedir(_d)  # also runs the .pth files (the editable install of maverick)
