"""The package boundaries (README, Layout): checked on the source, so a new import that crosses
one fails here, not in review."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__" and node.args
              and isinstance(node.args[0], ast.Constant)):
            out.add(str(node.args[0].value))
    return out


def _crossing(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(_imports(path)):
            if name.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_the_job_contract_imports_no_worker_openvino_or_operator_tool():
    assert _crossing("edge", ("workers", "openvino", "openvino_tokenizers", "edgectl")) == []


def test_keys_know_nothing_of_tasks_workers_or_the_daemon():
    assert _crossing("keys", ("edge", "workers", "edgectl", "openvino")) == []


def test_workers_do_not_import_the_operator_tools():
    assert _crossing("workers", ("edgectl",)) == []


def test_the_job_entry_point_loads_no_mqtt_client():
    code = "import sys, workers.perform; print(sorted(m for m in sys.modules if 'paho' in m))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"
