"""Architecture rules enforced by tests, not review: packages import only downward
(gateway → evals → policy | engine → audit), and the API process does not load the
model stack at import time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packages_import_only_downward():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is not installed"
    out = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_importing_the_api_does_not_load_transformers_or_peft():
    code = ("import sys, gateway.app, gateway.cli; "
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_route_commits_inside_its_request():
    """A request commits once, with its audit row, in gateway.context; a refusal that must
    leave a record behind writes it in a transaction of its own (audit.db.transaction)."""
    offenders = [f"{path.relative_to(ROOT)}:{number}"
                 for path in sorted((ROOT / "gateway").rglob("*.py"))
                 if path.name != "context.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if ".commit()" in line and not line.lstrip().startswith("#")]
    assert offenders == []


def test_one_function_writes_queue_rows():
    """Every pending future — each admitted request, each release evaluation — is written by
    engine.queue.enqueue, so a new kind of job cannot reach the worker around it."""
    import ast

    offenders = []
    for package in ("audit", "engine", "evals", "gateway", "policy"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "engine" / "queue.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Future":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_serve_worker_and_cli_are_wired_in_one_composition_root():
    """The database, model registry, screener, release policy and worker are built in
    gateway.composition only; `serve` (gateway.state), `worker` and the CLI commands call
    it."""
    import ast

    builders = {"make_engine", "make_sessionmaker", "upgrade_to_head", "ModelRegistry",
                "load_release_policy", "Worker", "ReleaseEvaluator", "Checkpointer"}
    offenders = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if path.name == "composition.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else \
                f"{getattr(func.value, 'id', '')}.{func.attr}" \
                if isinstance(func, ast.Attribute) else ""
            if name in builders or name == "Screener.build":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert offenders == []
