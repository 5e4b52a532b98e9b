"""What the launcher hands the stubs: the folders their embedded interpreter imports from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

from server.launch import REPOSITORY, stub_package_dirs


def test_pythonpath_comes_before_site_packages(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    env = {"PYTHONPATH": os.pathsep.join([str(first), "", "relative", str(first), str(second)])}
    dirs = stub_package_dirs(env).split(os.pathsep)
    site_packages = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    assert dirs == [str(first), os.path.abspath("relative"), str(second), *site_packages]
    assert stub_package_dirs({}).split(os.pathsep) == site_packages


def test_the_stubs_interpreter_imports_from_them_in_that_order(tmp_path):
    """maverick_env in an isolated interpreter (as the stub embeds it: PYTHONPATH ignored) puts the
    launcher's folders first, so a numpy placed on PYTHONPATH beats the interpreter's own."""
    shadow = tmp_path / "shadow"
    (shadow / "numpy").mkdir(parents=True)
    (shadow / "numpy" / "__init__.py").write_text("__version__ = 'shadow'\n")
    env = {**os.environ, "MAVERICK_SITE_PACKAGES": stub_package_dirs({"PYTHONPATH": str(shadow)})}
    code = (
        f"import sys; sys.path.insert(0, {str(REPOSITORY)!r}); import maverick_env, json, numpy; "
        "print(json.dumps([numpy.__version__, sys.path]))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], env=env, capture_output=True, text=True, check=True
    )
    version, path = json.loads(out.stdout)
    assert version == "shadow"
    assert path.index(str(shadow)) < path.index(sysconfig.get_paths()["purelib"])
