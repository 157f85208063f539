"""Generate the Python code for `protos/potluck/v1/agent.proto`; `--check` fails if it is stale.

The generated files are committed so an install needs no protoc; CI runs `--check` so they never
drift from the .proto.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/potluck/v1/agent.proto")
OUTPUTS = ("agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py")


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # dev dependency, only needed here

    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(ROOT)
        print(f"generated {', '.join(OUTPUTS)} from {PROTO}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in OUTPUTS
            if not (ROOT / PROTO.parent / name).exists()
            or not filecmp.cmp(Path(tmp) / PROTO.parent / name, ROOT / PROTO.parent / name, shallow=False)
        ]
    if stale:
        print(f"generated code is stale: {stale}; run `make protos`", file=sys.stderr)
        return 1
    print("generated protobuf code is fresh")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
