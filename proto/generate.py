"""Generate the Python stubs of the wire contract (``make proto``).

The sources live in ``proto/kvmha/v1/*.proto``; the stubs are committed in ``proto/v1/`` and import as
``kvmha.proto.v1``. protoc names Python modules after the path of the .proto below its include root, so the sources
are staged as ``kvmha/proto/v1/<name>.proto`` in a temporary root: the generated imports then read
``from kvmha.proto.v1 import agent_pb2``. ``tests/unit/test_proto_stubs.py`` regenerates into a temporary folder
and fails when the committed stubs differ (stale).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SOURCE_DIR = PROTO_ROOT / "kvmha" / "v1"
DEFAULT_OUT = PROTO_ROOT / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs of every .proto in SOURCE_DIR into out_dir; return the files written."""
    sources = sorted(SOURCE_DIR.glob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files in {SOURCE_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "src" / "kvmha" / "proto" / "v1"
        staged.mkdir(parents=True)
        for source in sources:
            shutil.copyfile(source, staged / source.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        args = [
            "grpc_tools.protoc",
            f"-I{Path(tmp) / 'src'}",
            f"-I{_well_known_include()}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={gen}",
            f"--mypy_grpc_out={gen}",
            *[f"kvmha/proto/v1/{s.name}" for s in sources],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for produced in sorted((gen / "kvmha" / "proto" / "v1").iterdir()):
            if produced.name.endswith(GENERATED_SUFFIXES):
                target = out_dir / produced.name
                shutil.copyfile(produced, target)
                written.append(target)
        return written


def _plugin(name: str) -> str:
    """mypy-protobuf's plugins sit beside the interpreter in the venv, which need not be on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the test extras (mypy-protobuf)")
    return found


def _well_known_include() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the stubs (default: proto/v1)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
