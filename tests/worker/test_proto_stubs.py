"""The committed stubs are exactly what proto/generate.py makes from the .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    generator = _load_generator()
    fresh = generator.generate(tmp_path)  # type: ignore[attr-defined]
    committed_root = ROOT / "proto" / "dgemma_proto"
    assert fresh, "protoc wrote nothing"
    fresh_names = {p.relative_to(tmp_path) for p in fresh}
    committed_names = {
        p.relative_to(committed_root)
        for p in (committed_root / "dgemma").rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi")
    }
    assert fresh_names == committed_names, "run `python proto/generate.py` and commit the result"
    for name in sorted(fresh_names):
        assert (tmp_path / name).read_text() == (committed_root / name).read_text(), (
            f"{name} is stale: run `python proto/generate.py` and commit the result"
        )


def test_stubs_import_from_the_dgemma_proto_package() -> None:
    from dgemma_proto.dgemma.v1 import denoiser_pb2, denoiser_pb2_grpc

    assert denoiser_pb2.DESCRIPTOR.package == "dgemma.v1"
    assert hasattr(denoiser_pb2_grpc, "DenoiserServicer")
    assert (ROOT / "proto" / "dgemma_proto" / "dgemma" / "v1" / "denoiser_pb2.pyi").exists()
