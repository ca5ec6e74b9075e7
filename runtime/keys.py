"""Keys: Ed25519 pack-signing keys, the station's trusted-key list, and ZeroMQ CURVE keypairs.

File layout (what `kaizen keys gen` writes into --out DIR):

    signing:  NAME.ed25519.key  (PKCS#8 PEM private key, mode 0600)
              NAME.ed25519.pub  (SubjectPublicKeyInfo PEM public key; copy it to stations)
    curve:    NAME.key          (z85 CURVE secret key, 40 chars + newline, mode 0600)
              NAME.pub          (z85 CURVE public key)

    kaizen keys gen --kind signing --out keys/ --name trainer-2025
    trusted = TrustedKeys.from_paths(["keys/"])          # every *.ed25519.pub in the folder
    trusted.get(key_id(pub))                             # a key id is 16 hex of sha256(raw public bytes)
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .durable import fsync_dir, write_synced
from .errors import ConfigError

SIGNING_KEY_SUFFIX = ".ed25519.key"
SIGNING_PUB_SUFFIX = ".ed25519.pub"
CURVE_KEY_SUFFIX = ".key"
CURVE_PUB_SUFFIX = ".pub"


# ---- Ed25519 signing keys -------------------------------------------------------------------

def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short id of a signing key: the first 16 hex chars of sha256 of the raw 32 public bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(public_bytes(public)).hexdigest()[:16]


def save_signing_key(key: Ed25519PrivateKey, out_dir: str | os.PathLike, name: str,
                     *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write NAME.ed25519.key (0600) and NAME.ed25519.pub into out_dir; return both paths."""
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return _write_pair(out_dir, name, SIGNING_KEY_SUFFIX, private_pem, SIGNING_PUB_SUFFIX, public_pem,
                       overwrite)


def load_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key; ConfigError naming the file if it is anything else."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"signing key {path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: is a {type(key).__name__}, expected Ed25519 "
                          "(make one with `kaizen keys gen --kind signing`)")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key; ConfigError naming the file if it is anything else."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"public key {path}: not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {path}: is a {type(key).__name__}, expected Ed25519")
    return key


class TrustedKeys:
    """The public keys a station accepts pack signatures from, by key id (several = rotation)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()):
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
        public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
        kid = key_id(public)
        self._keys[kid] = public
        return kid

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike]) -> TrustedKeys:
        """Load public keys from files and/or folders (a folder = every *.ed25519.pub in it)."""
        trusted = cls()
        for path in map(Path, paths):
            if path.is_dir():
                found = sorted(path.glob("*" + SIGNING_PUB_SUFFIX))
                if not found:
                    raise ConfigError(f"trusted keys folder {path}: no *{SIGNING_PUB_SUFFIX} files in it")
                for file in found:
                    trusted.add(load_public_key(file))
            else:
                trusted.add(load_public_key(path))
        if not trusted:
            raise ConfigError("no trusted keys given: pass at least one *.ed25519.pub file or folder")
        return trusted

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> TrustedKeys:
        return cls.from_paths([folder])

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustedKeys({self.ids})"


# ---- CURVE keypairs for ZeroMQ ---------------------------------------------------------------

def generate_curve_keypair(out_dir: str | os.PathLike, name: str,
                           *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (z85 secret, 0600) and NAME.pub (z85 public); return (secret, public) paths."""
    import zmq

    public, secret = zmq.curve_keypair()
    return _write_pair(out_dir, name, CURVE_KEY_SUFFIX, secret + b"\n", CURVE_PUB_SUFFIX, public + b"\n",
                       overwrite)


def load_curve_public(path: str | os.PathLike) -> bytes:
    """The z85 public key (40 bytes) in a NAME.pub file."""
    return _load_z85(path, "CURVE public key")


def load_curve_secret(path: str | os.PathLike) -> bytes:
    """The z85 secret key (40 bytes) in a NAME.key file."""
    return _load_z85(path, "CURVE secret key")


def load_curve_keypair(secret_path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from NAME.key; the public key is derived and checked against NAME.pub."""
    import zmq

    secret = load_curve_secret(secret_path)
    public = zmq.curve_public(secret)
    pub_path = Path(secret_path).with_suffix(CURVE_PUB_SUFFIX)
    if pub_path.exists() and load_curve_public(pub_path) != public:
        raise ConfigError(f"CURVE key {pub_path}: does not match the secret key {secret_path}")
    return public, secret


def _load_z85(path: str | os.PathLike, what: str) -> bytes:
    from zmq.utils import z85

    text = _read_key_file(path).strip()
    if len(text) != 40:
        raise ConfigError(f"{what} {path}: expected 40 z85 characters, got {len(text)}")
    try:
        z85.decode(text)
    except (ValueError, KeyError, IndexError) as err:
        raise ConfigError(f"{what} {path}: not z85 text ({err})") from None
    return text


# ---- shared ----------------------------------------------------------------------------------

def _read_key_file(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"key file {path}: cannot read it ({err.strerror or err})") from None


def _write_pair(out_dir, name: str, secret_suffix: str, secret: bytes, public_suffix: str,
                public: bytes, overwrite: bool) -> tuple[Path, Path]:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use a plain file name such as 'station-07'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = out / (name + secret_suffix), out / (name + public_suffix)
    for path in (secret_path, public_path):
        if path.exists() and not overwrite:
            raise ConfigError(f"key file {path} exists: pick another --name or remove it first")
    for path in (secret_path, public_path):
        path.unlink(missing_ok=True)
    write_synced(secret_path, secret, mode=0o600)
    os.chmod(secret_path, 0o600)  # exactly 0600 whatever the umask
    write_synced(public_path, public, mode=0o644)
    fsync_dir(out)
    return secret_path, public_path


def cli_gen(argv: list[str]) -> int:
    """`kaizen keys gen --kind signing|curve --out DIR --name NAME`."""
    parser = argparse.ArgumentParser(prog="kaizen keys gen", description=cli_gen.__doc__)
    parser.add_argument("--kind", choices=("signing", "curve"), required=True,
                        help="signing: Ed25519 key for packs; curve: ZeroMQ CURVE keypair")
    parser.add_argument("--out", required=True, help="folder to write the key files into")
    parser.add_argument("--name", required=True, help="base file name, e.g. trainer-2025 or station-07")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")
    args = parser.parse_args(argv)
    if args.kind == "signing":
        key = generate_signing_key()
        secret_path, public_path = save_signing_key(key, args.out, args.name, overwrite=args.force)
        print(f"signing key id {key_id(key)}")
    else:
        secret_path, public_path = generate_curve_keypair(args.out, args.name, overwrite=args.force)
    print(f"secret: {secret_path} (keep it private)\npublic: {public_path}")
    return 0
