"""Regenerate the checked-in gRPC code from protos/prefixcache/v1/*.proto.

    python protos/compile.py           # regenerate in place
    python protos/compile.py --check   # exit 1 if the checked-in code is stale

protoc runs with ``-I`` at the repository root, so the generated modules import
each other by package path (``from protos.prefixcache.v1 import ...``).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "prefixcache" / "v1"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    rel = [str(p.relative_to(ROOT)) for p in protos]
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", f"--pyi_out={out_root}", *rel]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return [out_root / "protos/prefixcache/v1" / (p.stem + s) for p in protos for s in SUFFIXES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = []
        for path in generated:
            target = PROTO_DIR / path.name
            if args.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(target.name)
            else:
                shutil.copyfile(path, target)
    if stale:
        print("stale generated code: " + ", ".join(stale) + " (run python protos/compile.py)")
        return 1
    print("generated code is current" if args.check else "regenerated " + str(len(generated)) + " files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
