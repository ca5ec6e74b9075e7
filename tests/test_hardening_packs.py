"""Issue 11, finding 3 and "signature first": hostile packs are PackErrors naming the file and the
reason, never RecursionError/MemoryError/RuntimeError, and a station writes nothing for a pack
before its signature and every member hash are checked.

Each test reproduces a way the old reader failed (noted per test); tars are crafted byte by byte
where `tarfile` would not write the hostile header.
"""

import io
import tarfile
import zipfile

import numpy as np
import pytest

from kaizen.runtime import pack as P
from kaizen.runtime import store_disk
from kaizen.runtime.errors import PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.pack_arrays import npy_bytes
from kaizen.runtime.store import PackStore
from kaizen.runtime.tarsafe import TarLimits, read_members, tar_bytes
from kaizen.runtime.testpacks import write_test_pack

FP = "hard-base"


@pytest.fixture(scope="module")
def sk():
    return generate_signing_key()


@pytest.fixture(scope="module")
def trusted(sk):
    return TrustedKeys([sk])


@pytest.fixture(scope="module")
def good(tmp_path_factory, sk):
    path = tmp_path_factory.mktemp("good") / "pick-1.kpk"
    write_test_pack(path, "pick", 1, sk, base_fingerprint=FP)
    return path


@pytest.fixture()
def store(tmp_path, trusted, good):
    """A store with pick v1 active, and a record of every install step it reaches."""
    steps = []
    with PackStore(tmp_path / "store", trusted, FP) as s:
        s.install(good)
        hook = getattr(store_disk, "set_fault_hook", None)  # (absent before issue 11: steps stay [])
        if hook is not None:
            hook(steps.append)
        s.steps = steps
        try:
            yield s
        finally:
            if hook is not None:
                hook(None)


def header(name: bytes, size_field: bytes = b"00000000000\0", kind: bytes = b"0") -> bytes:
    """One ustar header with a correct checksum and any size field / type flag."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def assert_refused_without_writes(store, path, match):
    """Installing `path` is a PackError naming it; the store never got past step 'begin'."""
    active, listing = store.active(), store.list()
    del store.steps[:]
    with pytest.raises(PackError, match=match) as info:
        store.install(path)
    assert str(path) in str(info.value)
    assert store.steps == ["begin"], store.steps          # no staging folder, no member written
    assert not list((store.root / "staging").iterdir())
    assert store.active() is active and store.list() == listing
    assert sorted(p.name for p in (store.root / "packs").iterdir()) == ["pick"]
    return str(info.value)


# ---- the writer and the order the reader needs ----------------------------------------------

def test_manifest_and_signature_are_the_first_two_members(good):
    with tarfile.open(good) as tf:
        assert tf.getnames()[:2] == ["manifest.json", "manifest.sig"]


def test_old_member_order_is_refused_and_resigning_reorders_it(tmp_path, good, sk, trusted):
    members = read_members(good)
    old = tmp_path / "old-order.kpk"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in sorted(members):  # what the writer did before: adapter.npz first
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tf.addfile(info, io.BytesIO(members[name]))
    old.write_bytes(buf.getvalue())
    with pytest.raises(PackError, match="missing member manifest.json .*first member.*kaizen pack sign"):
        P.read_pack(old, trusted)
    P.resign_pack(old, tmp_path / "new.kpk", sk, trusted)
    assert P.read_pack(tmp_path / "new.kpk", trusted).manifest.version == 1


# ---- finding 3: unsigned packs that crashed the daemon ---------------------------------------

def test_unsigned_pack_with_a_1000_level_member_path(tmp_path, store):
    """Old: store.py created the member's folders before the signature check -> RecursionError."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a/" * 1000 + "x.npy")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    bad = tmp_path / "deep.kpk"
    bad.write_bytes(buf.getvalue())
    assert_refused_without_writes(store, bad, "PAX extended header")


def test_deep_plain_ustar_path_is_refused(tmp_path, store):
    name = "/".join(["d"] * 40) + "/x"
    bad = tmp_path / "deep-ustar.kpk"
    bad.write_bytes(header(name[:100].encode()) + bytes(1024))
    assert_refused_without_writes(store, bad, "path too deep")


@pytest.mark.parametrize("signed", [False, True])
def test_deeply_nested_manifest(tmp_path, store, sk, signed):
    """Old: json.loads of the manifest before the signature check -> RecursionError."""
    nested = b"[" * 100_000 + b"]" * 100_000
    members = {"manifest.json": nested}
    if signed:
        members["manifest.sig"] = sk.sign(nested)
    bad = tmp_path / "nested.kpk"
    bad.write_bytes(tar_bytes(members))
    msg = assert_refused_without_writes(store, bad, "unsigned|bad signature|nested deeper")
    if signed:
        assert "malformed manifest: manifest.json: JSON nested deeper than 32 levels" in msg


@pytest.mark.parametrize("size_field", [b"\xff" * 12, b"\x80" + b"\xff" * 11, b"-0000000001\0", b"0000000001x\0"])
def test_negative_or_malformed_size_fields(tmp_path, store, size_field):
    """Old: tarfile took base-256 negative sizes (tarsafe.py:80 computed offsets backwards)."""
    bad = tmp_path / "negative.kpk"
    bad.write_bytes(header(b"manifest.json", size_field) + bytes(2048))
    assert_refused_without_writes(store, bad, "malformed tar header for member manifest.json: size field")


@pytest.mark.parametrize("kind, what", [(b"x", "PAX extended header"), (b"g", "PAX global header"),
                                        (b"L", "GNU long name"), (b"K", "GNU long link name")])
def test_gnu_and_pax_extension_headers_are_refused(tmp_path, store, kind, what):
    """Old: tarfile read a GNU long name / PAX header of any declared size into memory first."""
    bad = tmp_path / "ext.kpk"
    bad.write_bytes(header(b"././@LongLink", b"%011o\0" % (1 << 30), kind) + bytes(2048))
    assert_refused_without_writes(store, bad, what)


def test_directory_entries_count_against_max_members(tmp_path, trusted):
    """Old: directories were skipped before the member count (1,000,000 of them: 20 s, +437 MB)."""
    blob = b"".join(header(b"d%06d/" % i, kind=b"5") for i in range(2000)) + bytes(1024)
    bad = tmp_path / "dirs.kpk"
    bad.write_bytes(blob)
    with pytest.raises(PackError, match=r"too many members \(cap 1024, directory entries included\)"):
        P.read_pack(bad, trusted)
    with pytest.raises(PackError, match="too many members"):
        read_members(bad, TarLimits(max_members=10))


def test_a_pack_that_is_not_signed_is_never_read_past_its_signature(tmp_path, store, good):
    """Signature first: an unsigned pack is refused as unsigned even when a later member is hostile."""
    members = read_members(good)
    del members["manifest.sig"]
    blob = tar_bytes(members)
    tail = header(b"a/" * 40 + b"x", kind=b"2")  # a symlink with a deep name, after the manifest
    bad = tmp_path / "unsigned.kpk"
    bad.write_bytes(blob[:-1024] + tail + bytes(1024))
    assert_refused_without_writes(store, bad, r"unsigned \(no manifest.sig\)")


def test_signed_pack_with_a_tampered_member_writes_nothing(tmp_path, store, good):
    members = read_members(good)
    members["prompt.npy"] = members["prompt.npy"][:-1] + b"\x01"
    bad = tmp_path / "tampered.kpk"
    bad.write_bytes(tar_bytes(members))
    assert_refused_without_writes(store, bad, "tampered: member prompt.npy")


def test_member_not_listed_in_the_signed_manifest(tmp_path, store, good):
    members = dict(read_members(good), **{"golden/evil.png": b"\x89PNG\r\n\x1a\n"})
    bad = tmp_path / "extra.kpk"
    bad.write_bytes(tar_bytes(members))
    assert_refused_without_writes(store, bad, "unexpected member golden/evil.png")


# ---- finding 3: signed packs whose adapter.npz escaped as other exceptions --------------------

def signed_with(tmp_path, sk, good, trusted, name, data):
    contents = P.read_pack(good, trusted)
    files = {n: d for n, d in read_members(good).items() if n not in ("manifest.json", "manifest.sig")}
    fields = {k: v for k, v in contents.manifest.to_dict().items() if k not in ("sha256", "signing_key_id")}
    path = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}.kpk"
    P.write_signed_pack(path, fields, dict(files, **{name: data}), sk)
    return path


def npz_with(compression=zipfile.ZIP_STORED, encrypted=False):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        zf.writestr("lora.0.q_proj.A.npy", npy_bytes(np.zeros((2, 8), np.float32)))
    data = bytearray(buf.getvalue())
    if encrypted:  # set the "encrypted" flag bit in the local and central headers
        for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = data.index(sig) + off
            data[at] |= 1
    return bytes(data)


@pytest.mark.parametrize("data, reason", [
    (npz_with(encrypted=True), r"adapter.npz\[lora.0.q_proj.A.npy\]: encrypted zip entry"),
    (npz_with(zipfile.ZIP_BZIP2), r"adapter.npz\[lora.0.q_proj.A.npy\]: zip compression method 12"),
    (npz_with(zipfile.ZIP_LZMA), r"adapter.npz\[lora.0.q_proj.A.npy\]: zip compression method 14"),
])
def test_adapter_npz_encrypted_or_unknown_compression(tmp_path, store, sk, good, trusted, data, reason):
    """Old: zipfile raised RuntimeError / NotImplementedError out of pack_arrays.py:73."""
    bad = signed_with(tmp_path, sk, good, trusted, "adapter.npz", data)
    with pytest.raises(PackError, match=f"bad array {reason}"):
        P.read_pack(bad, trusted)
    assert_refused_without_writes(store, bad, reason)


def test_npy_header_claiming_a_huge_shape(tmp_path, sk, good, trusted):
    """Old: numpy allocated the claimed shape before reading (MemoryError, or GBs of RSS)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (300000, 800000)})
    huge = buf.getvalue() + bytes(96)  # 960 GB claimed, 96 bytes present
    bad = signed_with(tmp_path, sk, good, trusted, "prompt.npy", huge)
    with pytest.raises(PackError, match=r"bad array prompt.npy: header says shape \[300000, 800000\]"):
        P.read_pack(bad, trusted)


def test_deeply_nested_answers_json_in_a_signed_pack(tmp_path, sk, good, trusted):
    bad = signed_with(tmp_path, sk, good, trusted, "answers.json", b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(PackError, match="bad member answers.json: JSON nested deeper"):
        P.read_pack(bad, trusted)
