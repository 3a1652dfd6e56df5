"""The committed gRPC stubs are exactly what tools/gen_protos.py makes from protos/."""
import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")

from tools.gen_protos import ROOT, generate  # noqa: E402


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = generate(tmp_path)
    assert fresh
    stale = [str(p.relative_to(tmp_path)) for p in fresh
             if (ROOT / "common" / "proto" / p.relative_to(tmp_path)).read_bytes() != p.read_bytes()]
    assert not stale, f"stale stubs {stale}: run `python tools/gen_protos.py` and commit the result"
