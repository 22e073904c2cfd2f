"""Nothing a client can reach is unpickled: a scan of every Python file the project ships.

Pickle-based loaders run code from the bytes they read, so a replaced checkpoint or artifact
would run as the worker. The scan walks the syntax tree (not the text, so comments and
docstrings that mention pickle do not count) of services/, clients/ and deploy/ and fails on:
importing pickle-family modules; ``torch.load`` without ``weights_only=True``; ``np.load`` with
``allow_pickle`` other than ``False``; ``yaml.load`` without a safe loader, ``yaml.unsafe_load`` /
``full_load``; ``pandas.read_pickle``; ``from_pretrained(..., use_safetensors=False)``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCANNED = ("services", "clients", "deploy")
BANNED_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "cloudpickle",
    "dill",
    "joblib",
    "marshal",
    "shelve",
    "pickletools",
    "copyreg",
}
UNSAFE_YAML = {
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.unsafe_load_all",
    "yaml.full_load_all",
    "yaml.load_all",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _name(node: ast.AST) -> str:
    """Dotted name of ``a.b.c`` (``""`` for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unpickling_calls(source: str, filename: str = "<source>") -> list[str]:
    """``line: what`` for every unpickling construct in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in BANNED_MODULES:
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("torch.load", "torch.serialization.load") and not _is_const(
                _kw(node, "weights_only"), True
            ):
                found.append(f"{node.lineno}: {name} without weights_only=True")
            elif (
                name in ("np.load", "numpy.load")
                and _kw(node, "allow_pickle") is not None
                and not _is_const(_kw(node, "allow_pickle"), False)
            ):
                found.append(f"{node.lineno}: {name} with allow_pickle")
            elif name == "yaml.load":
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _name(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                    found.append(f"{node.lineno}: yaml.load without a safe Loader")
            elif name in UNSAFE_YAML or last == "read_pickle":
                found.append(f"{node.lineno}: {name}")
            elif last == "from_pretrained" and _is_const(_kw(node, "use_safetensors"), False):
                found.append(f"{node.lineno}: {name}(use_safetensors=False)")
    return found


def shipped_python() -> list[pathlib.Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50, "the scan found too few files: wrong root?"
    return files


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import dill as d",
        "from joblib import load",
        "import marshal",
        "import shelve",
        "from cloudpickle import loads",
        "torch.load(f)",
        "torch.load(f, map_location='cpu', weights_only=False)",
        "torch.load(f, weights_only=flag)",
        "np.load(f, allow_pickle=True)",
        "numpy.load(f, allow_pickle=x)",
        "yaml.load(text)",
        "yaml.load(text, Loader=yaml.Loader)",
        "yaml.unsafe_load(text)",
        "pd.read_pickle(p)",
        "UNet2DModel.from_pretrained(d, use_safetensors=False)",
    ],
)
def test_the_scan_catches_each_construct(snippet: str) -> None:
    assert unpickling_calls(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(f, map_location='cpu', weights_only=True)",
        "np.load(f)",
        "np.load(f, allow_pickle=False)",
        "yaml.safe_load(text)",
        "yaml.load(text, Loader=yaml.SafeLoader)",
        "json.load(fh)",
        "load_file(path)",
        "x = 'pickle'  # import pickle",
    ],
)
def test_the_scan_passes_safe_loading(snippet: str) -> None:
    assert unpickling_calls(snippet) == [], snippet


def test_no_unpickling_anywhere_in_shipped_code() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{hit}"
        for path in shipped_python()
        for hit in unpickling_calls(path.read_text(encoding="utf-8"), str(path))
    ]
    assert found == [], "unpickling calls:\n" + "\n".join(found)


def test_no_pickle_switches_in_scripts_and_configs() -> None:
    """Shell, YAML and Dockerfiles may run Python too: no flag that turns pickle loading on."""
    flags = ("weights_only=False", "allow_pickle=True", "yaml.unsafe_load", "pickle.load")
    found = []
    for d in SCANNED:
        for path in sorted((ROOT / d).rglob("*")):
            if not path.is_file() or path.suffix in (".py", ".safetensors", ".png", ".dcm"):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            found += [f"{path.relative_to(ROOT)}: {f}" for f in flags if f in text]
    assert found == [], found
