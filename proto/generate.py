"""Regenerate the committed Python stubs under proto/dgemma_proto from proto/dgemma/**/*.proto.

Run `python proto/generate.py` after editing a .proto; tests/worker/test_proto_stubs.py regenerates into
a temporary directory and fails on any difference. protoc writes `from dgemma.v1 import ...`; the
imports are rewritten to `dgemma_proto.dgemma.v1` so the stubs live inside the `dgemma_proto` package
(nothing is importable as a bare `dgemma`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = "dgemma_proto"
_IMPORT = re.compile(r"^(from|import) dgemma\.", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """The contract's .proto files, relative to `root`, in a stable order."""
    return sorted(p.relative_to(root) for p in (root / "dgemma").rglob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under `out_dir`; return the files."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in proto_files(root)),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for path in sorted(out_dir.joinpath("dgemma").rglob("*")):
        if path.is_dir():
            init = path / "__init__.py"
            init.touch()
            written.append(init)
        elif path.suffix in (".py", ".pyi") and path.name != "__init__.py":
            path.write_text(_IMPORT.sub(rf"\1 {PACKAGE}.dgemma.", path.read_text()))
            written.append(path)
    top_init = out_dir / "dgemma" / "__init__.py"
    top_init.touch()
    return sorted({*written, top_init})


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT / PACKAGE
    for f in generate(out):
        print(f)
