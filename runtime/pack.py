"""Task packs (.kpk): build a signed pack, read and verify one. The format is runtime/TASKPACK.md.

A pack is an uncompressed tar of manifest.json, manifest.sig (Ed25519 over the exact manifest
bytes), prompt.npy, key.npy, text_emb.npy, adapter.npz, and optionally answers.json, golden/ and
prompt_net.npz (the image-conditioned prompt's meta-net, runtime/prompt_net.py).
Reading never extracts: members are checked and read into memory, then the signature, hashes,
base, runtime version and arrays are verified; any problem is a PackError "pack FILE refused: ...".

    manifest = build_pack("out/pick-3.kpk", task_id="pick", version=3, method="kaizen",
                          base_fingerprint=fp, prompt=P, key=k, text_emb=T, lora=L,
                          instructions=["Is the part defective?"], signing_key=sk)
    contents = read_pack("out/pick-3.kpk", TrustedKeys([sk.public_key()]), base_fingerprint=fp)
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import jsonsafe
from .errors import PackError
from .keys import TrustedKeys, key_id
from .manifest import PACK_SCHEMA_VERSION, Manifest, ManifestFieldError, parse_version
from .pack_arrays import (
    GoldenSample,
    answers_bytes,
    check_arrays,
    golden_members,
    load_answers,
    load_golden,
    load_npy,
    load_npz,
    npy_bytes,
    npz_bytes,
)
from .pack_read import check_signature, read_signed_members
from .prompt_net import MEMBER as PROMPT_NET
from .prompt_net import check_prompt_net
from .tarsafe import DEFAULT_LIMITS, TarLimits, check_name, read_members, refuse, write_tar_atomic

__all__ = [
    "MANIFEST",
    "PACK_SCHEMA_VERSION",
    "REQUIRED_FILES",
    "SIGNATURE",
    "GoldenSample",
    "Manifest",
    "PackContents",
    "TarLimits",
    "build_pack",
    "pack_members",
    "read_pack",
    "read_pack_dir",
    "resign_pack",
    "verify_members",
    "verify_pack",
    "write_signed_pack",
]

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
REQUIRED_FILES = ("prompt.npy", "key.npy", "text_emb.npy", "adapter.npz")
OPTIONAL_FILES = ("answers.json", "golden/golden.json", PROMPT_NET)
GOLDEN_IMAGE_RE = re.compile(r"^golden/[A-Za-z0-9_-]{1,64}\.png$")
# The oldest runtime that reads a member (members not listed: 0.1.0). A pack declares the newest
# its members need as min_runtime_version, so an older station refuses it as "runtime too old"
# (checked before unknown members), not as a damaged pack, and still serves the packs it can.
MEMBER_SINCE = {PROMPT_NET: "0.2.0"}
FIRST_RUNTIME = "0.1.0"
SIGNATURE_BYTES = 64


@dataclass
class PackContents:
    """A verified pack in memory. `lora` maps decoder input names to arrays."""

    manifest: Manifest
    prompt: np.ndarray
    key: np.ndarray
    text_emb: np.ndarray
    lora: dict[str, np.ndarray]
    answers: list[str] | None = None
    golden: list[GoldenSample] = field(default_factory=list)
    prompt_net: dict[str, np.ndarray] | None = None  # {"W1", "W2"}: runtime/prompt_net.py


# ---- writing ---------------------------------------------------------------------------------

def build_pack(out_path: str | os.PathLike, *, task_id: str, version: int, method: str,
               base_fingerprint: str, prompt: np.ndarray, key: np.ndarray, text_emb: np.ndarray,
               lora: Mapping[str, np.ndarray], instructions: list[str], signing_key: Ed25519PrivateKey,
               answers: list[str] | None = None, golden: tuple[GoldenSample, ...] | list = (),
               metrics: dict[str, Any] | None = None, prompt_tokens: int | None = None,
               lora_rank: int | None = None, min_runtime_version: str | None = None,
               created_at: str | None = None, query_dims: list[int] | None = None,
               prompt_net: Mapping[str, np.ndarray] | None = None) -> Manifest:
    """Validate the arrays, write a signed pack atomically to out_path, return its manifest.

    prompt_tokens and lora_rank default to what the arrays say; passing them checks the arrays.
    `query_dims` [d_img, d_txt] writes schema 2 (key = image key and text key side by side, for
    unaligned query encoders); without it, schema 1 (one key shared by both queries).
    `prompt_net` {"W1", "W2"}: the image-conditioned prompt's meta-net (runtime/prompt_net.py).
    `min_runtime_version`: default, the oldest runtime that reads every member (MEMBER_SINCE);
    an older one than that is refused.
    """
    lora = dict(lora)
    fields_ = {
        "schema_version": 2 if query_dims else 1, "task_id": task_id, "version": version, "method": method,
        "base_fingerprint": base_fingerprint, "min_runtime_version": min_runtime_version or FIRST_RUNTIME,
        "prompt_tokens": _shape0(prompt) if prompt_tokens is None else prompt_tokens,
        "lora_rank": _infer_rank(lora) if lora_rank is None else lora_rank,
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "instructions": list(instructions), "metrics": dict(metrics or {}),
    }
    if query_dims:
        fields_["query_dims"] = [int(d) for d in query_dims]
    try:
        draft = Manifest(**fields_, sha256={"prompt.npy": "0" * 64}, signing_key_id="0" * 16)
        check_arrays(draft, prompt, key, text_emb, lora)
        if prompt_net is not None:
            prompt_net = dict(prompt_net)
            check_prompt_net(prompt_net, *_net_dims(draft, prompt, key))
        files = pack_members(prompt, key, text_emb, lora, answers, golden, prompt_net)
    except ValueError as err:
        raise PackError(f"cannot write pack {out_path}: {err}") from None
    needed = needed_runtime(files)  # the draft above has checked an explicit version's form
    if min_runtime_version is None:
        fields_["min_runtime_version"] = needed
    elif parse_version(min_runtime_version) < parse_version(needed):
        raise PackError(f"cannot write pack {out_path}: min_runtime_version {min_runtime_version} is older than "
                        f"{needed}, the oldest runtime that reads its members (leave it out for the default)")
    return write_signed_pack(out_path, fields_, files, signing_key)


def pack_members(prompt: np.ndarray, key: np.ndarray, text_emb: np.ndarray, lora: Mapping[str, np.ndarray],
                 answers: list[str] | None = None, golden=(), prompt_net=None) -> dict[str, bytes]:
    """The data members of a pack (everything except manifest.json and manifest.sig)."""
    files = {"prompt.npy": npy_bytes(prompt), "key.npy": npy_bytes(key),
             "text_emb.npy": npy_bytes(text_emb), "adapter.npz": npz_bytes(dict(lora))}
    if prompt_net is not None:
        files[PROMPT_NET] = npz_bytes(dict(prompt_net))
    if answers is not None:
        load_answers(answers_bytes(answers))  # same rules as the reader
        files["answers.json"] = answers_bytes(answers)
    files.update(golden_members(list(golden)))
    return files


def needed_runtime(members) -> str:
    """The oldest runtime version that reads every one of `members` (MEMBER_SINCE)."""
    return max([FIRST_RUNTIME] + [MEMBER_SINCE[m] for m in members if m in MEMBER_SINCE], key=parse_version)


def write_signed_pack(out_path: str | os.PathLike, manifest_fields: dict[str, Any],
                      files: dict[str, bytes], signing_key: Ed25519PrivateKey) -> Manifest:
    """Low level: hash `files`, complete and sign the manifest, write the tar atomically.

    `manifest_fields` are the Manifest fields other than sha256 and signing_key_id. No array
    checks happen here (build_pack does them); tests use this to make deliberately bad packs.
    """
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    try:
        manifest = Manifest(**manifest_fields, sha256=hashes, signing_key_id=key_id(signing_key))
    except (ValueError, TypeError) as err:
        raise PackError(f"cannot write pack {out_path}: manifest {err}") from None
    write_tar_atomic(out_path, sign_members(manifest, files, signing_key))
    return manifest


def sign_members(manifest: Manifest, files: dict[str, bytes], signing_key: Ed25519PrivateKey) -> dict[str, bytes]:
    data = manifest.to_json()
    return {**files, MANIFEST: data, SIGNATURE: signing_key.sign(data)}


def resign_pack(src: str | os.PathLike, dst: str | os.PathLike, signing_key: Ed25519PrivateKey,
                trusted_keys: TrustedKeys | None, limits: TarLimits = DEFAULT_LIMITS) -> Manifest:
    """Re-sign a pack with another key (rotation). The hashes are always checked; the old
    signature is checked against trusted_keys unless it is None (an explicit choice)."""
    members = read_members(src, limits)
    if trusted_keys is None:
        old = verify_members(src, members, None, limits=limits, _skip_signature=True).manifest
    else:
        old = verify_members(src, members, trusted_keys, limits=limits).manifest
    new = replace(old, signing_key_id=key_id(signing_key))
    files = {n: d for n, d in members.items() if n not in (MANIFEST, SIGNATURE)}
    write_tar_atomic(dst, sign_members(new, files, signing_key))
    return new


# ---- reading ---------------------------------------------------------------------------------

def read_pack(path: str | os.PathLike, trusted_keys: TrustedKeys, *, base_fingerprint: str | None = None,
              runtime_version: str | None = None, limits: TarLimits = DEFAULT_LIMITS) -> PackContents:
    """Read and fully verify a .kpk; PackError "pack PATH refused: REASON" on any problem.

    Signature first (runtime/pack_read.py): manifest.json + manifest.sig are verified before any
    other member is read, and every member is checked against its signed sha256 as it is read.
    """
    if not isinstance(trusted_keys, TrustedKeys):
        raise TypeError("trusted_keys must be a TrustedKeys")
    members = read_signed_members(path, trusted_keys, limits)
    return verify_members(path, members, trusted_keys, base_fingerprint=base_fingerprint,
                          runtime_version=runtime_version, limits=limits)


def verify_pack(path: str | os.PathLike, trusted_keys: TrustedKeys, *, base_fingerprint: str | None = None,
                runtime_version: str | None = None, limits: TarLimits = DEFAULT_LIMITS) -> Manifest:
    """Same checks as read_pack; returns only the manifest."""
    return read_pack(path, trusted_keys, base_fingerprint=base_fingerprint,
                     runtime_version=runtime_version, limits=limits).manifest


def read_pack_dir(folder: str | os.PathLike, trusted_keys: TrustedKeys, *, base_fingerprint: str | None = None,
                  runtime_version: str | None = None, limits: TarLimits = DEFAULT_LIMITS,
                  label: str | os.PathLike | None = None) -> PackContents:
    """Read and verify an extracted pack folder (the pack store's layout), same checks as read_pack.

    Messages name `label` (e.g. the .kpk the folder was staged from) instead of the folder if given.
    """
    folder = Path(folder)
    source = folder if label is None else label
    members: dict[str, bytes] = {}
    try:
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            if path.is_symlink():
                raise refuse(source, f"unsafe member {name}: symbolic link")
            if path.is_dir():
                continue
            check_name(source, name)
            if path.stat().st_size > limits.max_member_bytes:
                raise refuse(source, f"member {name} too large")
            members[name] = path.read_bytes()
    except OSError as err:
        raise refuse(source, f"cannot read the folder ({err.strerror or err})") from err
    return verify_members(source, members, trusted_keys, base_fingerprint=base_fingerprint,
                          runtime_version=runtime_version, limits=limits)


def verify_members(source: str | os.PathLike, members: dict[str, bytes], trusted_keys: TrustedKeys | None,
                   *, base_fingerprint: str | None = None, runtime_version: str | None = None,
                   limits: TarLimits = DEFAULT_LIMITS, _skip_signature: bool = False) -> PackContents:
    """Verify a pack given as {member name: bytes}: layout, signature, manifest, hashes, base,
    runtime version, arrays. Raises PackError naming `source` and the reason."""
    _check_layout(source, members, require_signature=not _skip_signature)
    if _skip_signature:
        manifest = _parse_manifest(source, members[MANIFEST])
    else:
        if not isinstance(trusted_keys, TrustedKeys):
            raise TypeError("trusted_keys must be a TrustedKeys")
        _check_signature(source, members, trusted_keys)
        manifest = _parse_manifest(source, members[MANIFEST])
    _check_hashes(source, members, manifest)
    if base_fingerprint is not None and manifest.base_fingerprint != base_fingerprint:
        raise refuse(source, f"wrong base: pack built for base {manifest.base_fingerprint}, "
                             f"this station runs base {base_fingerprint} (export the task for this base)")
    if runtime_version is not None and \
            parse_version(manifest.min_runtime_version) > parse_version(runtime_version, "runtime_version"):
        raise refuse(source, f"runtime too old: pack needs runtime >= {manifest.min_runtime_version}, "
                             f"this is {runtime_version} (upgrade kaizen-edge)")
    _check_known_members(source, members)  # after the version: a newer pack's members say "too old"
    return _decode(source, members, manifest, limits)


def _check_known_members(source, members: dict[str, bytes]) -> None:
    for name in sorted(members):
        if name not in (MANIFEST, SIGNATURE, *REQUIRED_FILES, *OPTIONAL_FILES) \
                and not GOLDEN_IMAGE_RE.match(name):
            raise refuse(source, f"unexpected member {name} (not part of pack schema {PACK_SCHEMA_VERSION})")


def _check_layout(source, members: dict[str, bytes], require_signature: bool = True) -> None:
    if MANIFEST not in members:
        raise refuse(source, f"missing member {MANIFEST}")
    if require_signature and SIGNATURE not in members:
        raise refuse(source, f"unsigned (no {SIGNATURE}): sign it with `kaizen pack sign`")
    for name in REQUIRED_FILES:
        if name not in members:
            raise refuse(source, f"missing member {name}")


def _check_signature(source, members: dict[str, bytes], trusted_keys: TrustedKeys) -> None:
    """Verify the raw manifest bytes before parsing them (pack_read.check_signature), then check
    that the manifest names the key that signed it."""
    signer = check_signature(source, members[MANIFEST], members[SIGNATURE], trusted_keys)
    claimed = _parse_manifest(source, members[MANIFEST]).signing_key_id
    if claimed != signer:
        raise refuse(source, f"bad signature: {MANIFEST} names key {claimed} but was signed by key {signer}")


def _parse_manifest(source, data: bytes) -> Manifest:
    try:
        jsonsafe.loads(MANIFEST, data)  # bounded nesting first: json.loads recurses per level
    except ValueError as err:
        raise refuse(source, f"malformed manifest: {err}") from None
    try:
        return Manifest.from_json(data)
    except ManifestFieldError as err:
        raise refuse(source, f"malformed manifest: {err}") from None
    except TypeError as err:
        raise refuse(source, f"malformed manifest: {err}") from None


def _check_hashes(source, members: dict[str, bytes], manifest: Manifest) -> None:
    files = set(members) - {MANIFEST, SIGNATURE}
    for name in sorted(set(manifest.sha256) - files):
        raise refuse(source, f"missing member {name} (listed in the manifest)")
    for name in sorted(files - set(manifest.sha256)):
        raise refuse(source, f"unexpected member {name} (not listed in the manifest's sha256)")
    for name in sorted(files):
        if hashlib.sha256(members[name]).hexdigest() != manifest.sha256[name]:
            raise refuse(source, f"tampered: member {name} does not match its sha256 in the manifest")


def _decode(source, members: dict[str, bytes], manifest: Manifest, limits: TarLimits) -> PackContents:
    try:
        prompt = load_npy("prompt.npy", members["prompt.npy"])
        key = load_npy("key.npy", members["key.npy"])
        text_emb = load_npy("text_emb.npy", members["text_emb.npy"])
        lora = load_npz("adapter.npz", members["adapter.npz"], limits.max_member_bytes)
        check_arrays(manifest, prompt, key, text_emb, lora)
        net = None
        if PROMPT_NET in members:
            net = load_npz(PROMPT_NET, members[PROMPT_NET], limits.max_member_bytes)
            check_prompt_net(net, *_net_dims(manifest, prompt, key))
    except ValueError as err:
        raise refuse(source, f"bad array {err}") from None
    try:
        answers = load_answers(members["answers.json"]) if "answers.json" in members else None
        golden = load_golden(members)
    except ValueError as err:
        raise refuse(source, f"bad member {err}") from None
    return PackContents(manifest, prompt, key, text_emb, lora, answers, golden, net)


def _net_dims(manifest: Manifest, prompt: np.ndarray, key: np.ndarray) -> tuple[int, int, int]:
    """(prompt_tokens, d_model, d_img) a prompt net must fit: d_img is the image query's width (the
    image half of a schema-2 key, the whole shared key of schema 1)."""
    dims = list(manifest.query_dims)
    return manifest.prompt_tokens, int(prompt.shape[1]), int(dims[0] if dims else key.shape[0])


def _shape0(array: Any) -> Any:
    return array.shape[0] if isinstance(array, np.ndarray) and array.ndim >= 1 else None


def _infer_rank(lora: Mapping[str, np.ndarray]) -> int:
    ranks = {a.shape[0] for n, a in lora.items() if n.endswith(".A") and getattr(a, "ndim", 0) == 2}
    return ranks.pop() if len(ranks) == 1 else (0 if not lora else -1)
