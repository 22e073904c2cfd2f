"""Contracts and the SDK surface: generated code is fresh, the SDK needs no torch."""

from __future__ import annotations

import filecmp
import importlib
import pathlib
import subprocess
import sys

import clinisynth

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        gen = importlib.import_module("gen_protos")
    finally:
        sys.path.pop(0)
    gen.generate(tmp_path)
    fresh = tmp_path / "clinisynth" / "v1"
    committed = ROOT / "clients" / "clinisynth" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(
        p.name for p in committed.iterdir() if p.is_file() and not p.name.endswith(".pyc")
    )
    stale = [n for n in names if not filecmp.cmp(fresh / n, committed / n, shallow=False)]
    assert not stale, f"run `make protos`: generated code is stale for {stale}"


def test_every_service_and_rpc_is_documented():
    """Each proto file opens with a comment; each rpc has a comment right above it."""
    undocumented = []
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        lines = proto.read_text().splitlines()
        if not lines[0].startswith("//"):
            undocumented.append(f"{proto.name}: no header comment")
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("rpc ") and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{i + 1}: {stripped}")
    assert not undocumented, "\n".join(undocumented)


def test_sdk_public_names_are_exactly_all():
    public = sorted(n for n in dir(clinisynth) if not n.startswith("_"))
    exported = sorted(set(clinisynth.__all__) - {"__version__"})
    modules = {"cli", "v1"}
    assert sorted(set(public) - modules) == exported
    for name in clinisynth.__all__:
        assert hasattr(clinisynth, name), name


def test_sdk_and_cli_import_without_torch():
    code = (
        "import sys, clinisynth, clinisynth.cli; clinisynth.cli.build_parser();"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'tritonclient', 'minio')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
