"""`kaizen pack inspect|verify|sign`: look into, check and (re)sign task packs from the shell.

    kaizen pack inspect pick-3.kpk
    kaizen pack verify pick-3.kpk --trust keys/ [--base-fingerprint FP] [--runtime-version 0.1.0]
    kaizen pack sign pick-3.kpk --key keys/trainer-2026.ed25519.key --trust keys/ [--out pick-3b.kpk]

verify exits 0 and prints "OK ..." for a good pack, or exits 1 with the refusal reason.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import numpy as np

from .errors import ConfigError, PackError
from .keys import TrustedKeys, load_signing_key
from .pack import MANIFEST, resign_pack, verify_pack
from .tarsafe import read_members


def inspect_pack(path: str) -> dict:
    """Manifest + member sizes + array shapes, WITHOUT verifying the signature (for humans)."""
    members = read_members(path)
    if MANIFEST not in members:
        raise PackError(f"pack {path} refused: missing member {MANIFEST}")
    try:
        manifest = json.loads(members[MANIFEST])
    except (ValueError, UnicodeDecodeError) as err:
        raise PackError(f"pack {path} refused: malformed manifest: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise PackError(f"pack {path} refused: malformed manifest: not a JSON object")
    arrays: dict[str, dict] = {}
    for name, data in sorted(members.items()):
        for array_name, array in _arrays_in(name, data).items():
            arrays[array_name] = {"dtype": str(array.dtype), "shape": list(array.shape)}
    return {"manifest": manifest, "sizes": {n: len(d) for n, d in sorted(members.items())},
            "total_bytes": sum(len(d) for d in members.values()), "arrays": arrays}


def _arrays_in(name: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        if name.endswith(".npy"):
            return {name: np.load(io.BytesIO(data), allow_pickle=False)}
        if name.endswith(".npz"):
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {f"{name}[{k}]": npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as err:
        raise PackError(f"pack inspect: {name} is not a readable array ({err})") from None
    return {}


def cli_inspect(argv: list[str]) -> int:
    """Print a pack's manifest as JSON, then member sizes and array shapes."""
    parser = argparse.ArgumentParser(prog="kaizen pack inspect", description=cli_inspect.__doc__)
    parser.add_argument("pack", help="the .kpk file")
    parser.add_argument("--json", action="store_true", help="print one JSON object (manifest, sizes, arrays)")
    args = parser.parse_args(argv)
    info = inspect_pack(args.pack)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(json.dumps(info["manifest"], indent=2, sort_keys=True))
    m = info["manifest"]
    print(f"\n{args.pack}: task {m.get('task_id')} v{m.get('version')} ({m.get('method')}), "
          f"{info['total_bytes']} bytes, signed by key {m.get('signing_key_id')} (not verified here)")
    for name, size in info["sizes"].items():
        print(f"  {name:<24} {size:>12} bytes")
    for name, spec in info["arrays"].items():
        print(f"  {name:<40} {spec['dtype']:<8} {spec['shape']}")
    return 0


def cli_verify(argv: list[str]) -> int:
    """Verify signature, hashes, arrays (and base/runtime if given). Exit 0 if good, 1 if refused."""
    parser = argparse.ArgumentParser(prog="kaizen pack verify", description=cli_verify.__doc__)
    parser.add_argument("pack", help="the .kpk file")
    parser.add_argument("--trust", action="append", required=True,
                        help="a *.ed25519.pub file or a folder of them (repeatable)")
    parser.add_argument("--base-fingerprint", default=None, help="refuse packs built for another base")
    parser.add_argument("--runtime-version", default=None, help="refuse packs that need a newer runtime")
    args = parser.parse_args(argv)
    try:
        trusted = TrustedKeys.from_paths(args.trust)
        m = verify_pack(args.pack, trusted, base_fingerprint=args.base_fingerprint,
                        runtime_version=args.runtime_version)
    except (PackError, ConfigError) as err:
        print(f"REFUSED {err}", file=sys.stderr)
        return 1
    print(f"OK {args.pack}: task {m.task_id} v{m.version}, base {m.base_fingerprint}, "
          f"signed by {m.signing_key_id}")
    return 0


def cli_sign(argv: list[str]) -> int:
    """Re-sign a pack with a signing key (e.g. after key rotation); hashes are always checked."""
    parser = argparse.ArgumentParser(prog="kaizen pack sign", description=cli_sign.__doc__)
    parser.add_argument("pack", help="the .kpk file to re-sign")
    parser.add_argument("--key", required=True, help="the new NAME.ed25519.key signing key")
    parser.add_argument("--out", default=None, help="write here (default: replace the pack in place)")
    check = parser.add_mutually_exclusive_group(required=True)
    check.add_argument("--trust", action="append",
                       help="check the current signature against these public keys first")
    check.add_argument("--unverified", action="store_true",
                       help="do not check the current signature (unsigned input, lost old key)")
    args = parser.parse_args(argv)
    key = load_signing_key(args.key)
    trusted = None if args.unverified else TrustedKeys.from_paths(args.trust)
    out = args.out or args.pack
    m = resign_pack(args.pack, out, key, trusted)
    print(f"signed {out}: task {m.task_id} v{m.version} with key {m.signing_key_id}")
    return 0
