"""Signature first: read a .kpk so that nothing unsigned is parsed, kept or written.

The first two tar members must be manifest.json (at most MAX_MANIFEST_BYTES) and manifest.sig.
Their signature is checked against the trusted keys on the raw bytes, before any JSON is parsed;
only then is the manifest parsed (depth-bounded) and every later member checked from its header
(a name the signed manifest lists, no duplicate, within the caps) and against its signed sha256
as it is read. What comes back has passed the signature and every hash; pack.verify_members then
does the content checks (base, runtime, arrays) in memory, and only then does the store write.

    members = read_signed_members("pick-3.kpk", trusted_keys, limits)   # PackError on any problem
"""

from __future__ import annotations

import hashlib
import os
import re

from cryptography.exceptions import InvalidSignature

from .keys import TrustedKeys, key_id
from .manifest import Manifest
from .tarsafe import DEFAULT_LIMITS, TarLimits, TarReader, open_tar, refuse

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20
SIGNATURE_BYTES = 64
MAX_SIGNATURE_MEMBER = 4096
_KEY_ID_RE = re.compile(rb'"signing_key_id"\s*:\s*"([0-9a-f]{16})"')


def read_signed_members(path: str | os.PathLike, trusted_keys: TrustedKeys,
                        limits: TarLimits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """{name: bytes} of a pack whose signature and member hashes all check out; PackError otherwise."""
    if not isinstance(trusted_keys, TrustedKeys):
        raise TypeError("trusted_keys must be a TrustedKeys")
    with open_tar(path, limits) as tar:
        manifest_bytes = _first(tar, MANIFEST, min(MAX_MANIFEST_BYTES, limits.max_member_bytes),
                                f"missing member {MANIFEST} (it must be the first member of the tar; "
                                "re-sign older packs with `kaizen pack sign` to reorder them)")
        signature = _first(tar, SIGNATURE, MAX_SIGNATURE_MEMBER,
                           f"unsigned (no {SIGNATURE}): sign it with `kaizen pack sign` "
                           f"({SIGNATURE} must be the second member of the tar)")
        signer = check_signature(path, manifest_bytes, signature, trusted_keys)
        manifest = parse_manifest(path, manifest_bytes)
        if manifest.signing_key_id != signer:
            raise refuse(path, f"bad signature: {MANIFEST} names key {manifest.signing_key_id} "
                               f"but was signed by key {signer}")
        members = {MANIFEST: manifest_bytes, SIGNATURE: signature}
        members.update(_signed_rest(tar, manifest))
    for name in sorted(set(manifest.sha256) - set(members)):
        raise refuse(path, f"missing member {name} (listed in the manifest)")
    return members


def _first(tar: TarReader, name: str, cap: int, missing: str) -> bytes:
    entry = tar.next()
    if entry is None or entry.name != name:
        raise refuse(tar.source, missing)
    if entry.size > cap:
        raise refuse(tar.source, f"member {name} too large ({entry.size} bytes, cap {cap})")
    return tar.read(entry)


def check_signature(source, manifest_bytes: bytes, signature: bytes, trusted_keys: TrustedKeys) -> str:
    """The id of the trusted key whose Ed25519 signature over the raw manifest bytes verifies.

    No JSON is parsed: every trusted key is tried. The refusal names the key the manifest claims
    (found with a bounded regex) when there is one, so the operator knows which key is missing.
    """
    claimed = _KEY_ID_RE.search(manifest_bytes)
    kid = claimed.group(1).decode() if claimed else None
    if kid is not None and kid not in trusted_keys:
        raise refuse(source, f"signed by unknown key {kid} (trusted: {', '.join(trusted_keys.ids) or 'none'}); "
                             "add its .ed25519.pub to the trusted keys or re-sign the pack")
    if len(signature) != SIGNATURE_BYTES:
        raise refuse(source, f"bad signature ({SIGNATURE} is {len(signature)} bytes, expected {SIGNATURE_BYTES})")
    candidates = [kid] if kid is not None else trusted_keys.ids
    for candidate in candidates:
        try:
            trusted_keys.get(candidate).verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return key_id(trusted_keys.get(candidate))
    if kid is not None:
        raise refuse(source, f"bad signature: {MANIFEST} does not match {SIGNATURE} for key {kid} "
                             "(altered after signing)")
    raise refuse(source, f"bad signature: {MANIFEST} is not signed by any trusted key "
                         f"(trusted: {', '.join(trusted_keys.ids) or 'none'})")


def parse_manifest(source, data: bytes) -> Manifest:
    """The pack's manifest (pack._parse_manifest: depth-bounded JSON, every field checked)."""
    from .pack import _parse_manifest

    return _parse_manifest(source, data)


def _signed_rest(tar: TarReader, manifest: Manifest) -> dict[str, bytes]:
    """Every member after the signature: listed by the signed manifest, once, matching its sha256."""
    members: dict[str, bytes] = {}
    while (entry := tar.next()) is not None:
        name = entry.name
        if name in (MANIFEST, SIGNATURE) or name in members:
            raise refuse(tar.source, f"duplicate member {name}")
        if name not in manifest.sha256:
            raise refuse(tar.source, f"unexpected member {name} (not listed in the manifest's sha256)")
        data = tar.read(entry)
        if hashlib.sha256(data).hexdigest() != manifest.sha256[name]:
            raise refuse(tar.source, f"tampered: member {name} does not match its sha256 in the manifest")
        members[name] = data
    return members
