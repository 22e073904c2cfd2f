"""Generate the Python gRPC code from protos/ into clients/clinisynth/v1 (never edit it by hand).

Usage: python scripts/gen_protos.py [--out DIR]   (default: the SDK package).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "clients"


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc on every .proto; return the generated files under out_root/clinisynth/v1."""
    from grpc_tools import protoc  # imported lazily: only the build needs grpcio-tools

    proto_files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *proto_files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        target = out_root / "clinisynth" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((pathlib.Path(tmp) / "clinisynth" / "v1").iterdir()):
            dst = target / src.name
            shutil.copyfile(src, dst)
            written.append(dst)
        init = target / "__init__.py"
        init.write_text('"""Generated from protos/clinisynth/v1 by scripts/gen_protos.py."""\n')
        written.append(init)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
