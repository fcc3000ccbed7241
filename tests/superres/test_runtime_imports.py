"""The device runtime must not need the build host's heavy packages."""

from __future__ import annotations

import subprocess
import sys


def test_loading_the_task_imports_no_torch_diffusers_or_pil():
    code = ("import sys, workers.superres; "
            "bad = [m for m in ('torch', 'diffusers', 'PIL', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
