"""Regenerate the gRPC stubs from protos/ into common/proto/ (one place: neither process package
imports the other).

    python tools/gen_protos.py            # write stubs into common/proto/
    python tools/gen_protos.py --out DIR  # write them elsewhere (the staleness test does)

protoc names a generated module by its .proto path (`neuron.v1.neuron_pb2`), so the imports the
generator writes between stubs are rewritten to live under `common.proto`.

Stubs are committed so installs need no grpcio-tools. grpcio-tools is pinned (pyproject `dev`)
because newer generators emit stubs that refuse to import under older grpcio/protobuf runtimes.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
STUB_PACKAGE = "common.proto"
_STUB_IMPORT = re.compile(r"^(from|import) ((?:cortex|neuron)\.v1)\b", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(PROTO_DIR)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    stems = [p.relative_to(PROTO_DIR).with_suffix("") for p in proto_files()]
    paths = [out / f"{stem}{suffix}" for stem in stems for suffix in STUB_SUFFIXES]
    for path in paths:
        path.write_text(_STUB_IMPORT.sub(rf"\1 {STUB_PACKAGE}.\2", path.read_text()))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "common" / "proto")
    out = parser.parse_args().out
    for path in generate(out):
        print(path.relative_to(out))


if __name__ == "__main__":
    sys.exit(main())
