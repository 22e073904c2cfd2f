"""The research kit stays apart: the product never imports it, and the CLI says how to get it."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "services" / "clinisynth_server", ROOT / "clients" / "clinisynth"]
#: The CLI commands that exist to run lab code; they import it lazily (cli/_common.lab_module).
LAZY_ALLOWED = {ROOT / "clients/clinisynth/cli/_common.py"}


def _imports(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_product_never_imports_the_lab() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for root in PRODUCT
        for path in sorted(root.rglob("*.py"))
        if path not in LAZY_ALLOWED
        for name in _imports(path)
        if name.split(".")[0] == "clinisynth_lab"
    ]
    assert offenders == []


def test_shipped_cell_checklists_match_the_phantom_oracle() -> None:
    """Raters see the criteria the oracle applies: the product's copy equals the lab's source."""
    from clinisynth_lab.phantoms import cells
    from clinisynth_server.reward import checklists

    shipped = json.loads(
        (pathlib.Path(checklists.__file__).with_name(checklists.CELL_CHECKLISTS_FILE)).read_text()
    )
    assert shipped["cell_types"] == list(cells.CELL_TYPES)
    assert shipped["checklists"] == cells.checklist_dict()
    assert checklists.known_cell_classes() == tuple(cells.CELL_TYPES)


def test_cli_benchmark_without_the_lab_names_the_install_step(tmp_path: pathlib.Path) -> None:
    argv = ["benchmark", "generator"]
    # Block the package the way an SDK-only install lacks it (a None entry makes import fail).
    code = (
        "import sys; sys.modules['clinisynth_lab'] = None\n"
        "from clinisynth.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode != 0
    assert "pip install -e lab/" in proc.stderr
    assert "Traceback" not in proc.stderr
