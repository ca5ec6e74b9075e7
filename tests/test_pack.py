"""Task packs: round trip, every refusal with its own message, key rotation, keys, CLI, spec doc."""

import io
import json
import re
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kaizen.runtime import keys as K
from kaizen.runtime import pack as P
from kaizen.runtime import pack_cli
from kaizen.runtime.errors import ConfigError, PackError
from kaizen.runtime.manifest import REQUIRED_FIELDS
from kaizen.runtime.pack_arrays import npy_bytes, npz_bytes
from kaizen.runtime.tarsafe import TarLimits, read_members, tar_bytes
from kaizen.runtime.testpacks import make_arrays, tiny_png, write_test_pack

ROOT = Path(__file__).resolve().parents[1]
FP = "base-fp-1"


@pytest.fixture(scope="module")
def sk():
    return K.generate_signing_key()


@pytest.fixture(scope="module")
def trusted(sk):
    return K.TrustedKeys([sk.public_key()])


@pytest.fixture()
def good(tmp_path, sk):
    path = tmp_path / "pick-1.kpk"
    write_test_pack(path, "pick", 1, sk, base_fingerprint=FP, golden=2)
    return path


def members_of(path):
    return read_members(path)


def write_members(path, members):
    Path(path).write_bytes(tar_bytes(members))
    return path


def refused(path, trusted, match, **kw):
    with pytest.raises(PackError, match=match) as info:
        P.read_pack(path, trusted, **kw)
    assert str(path) in str(info.value)
    return str(info.value)


def resigned(path, sk, members, manifest_bytes):
    members = dict(members, **{P.MANIFEST: manifest_bytes, P.SIGNATURE: sk.sign(manifest_bytes)})
    return write_members(path, members)


def with_files(path, sk, base_manifest, files):
    """A correctly hashed and signed pack whose data members are `files` (bad arrays on purpose)."""
    fields = {k: v for k, v in base_manifest.to_dict().items() if k not in ("sha256", "signing_key_id")}
    P.write_signed_pack(path, fields, files, sk)
    return path


# ---- round trip ------------------------------------------------------------------------------

def test_round_trip_arrays_and_manifest(tmp_path, sk, trusted):
    arrays = make_arrays(3, d_model=8, d_clip=6, prompt_tokens=4, n_instructions=2, rank=2, layers=2)
    golden = [P.GoldenSample(tiny_png(7), "Is it bent?", "yes")]
    path = tmp_path / "bend-3.kpk"
    written = P.build_pack(path, task_id="bend", version=3, method="kaizen", base_fingerprint=FP,
                           answers=["yes", "no"], golden=golden, metrics={"acc": 0.75},
                           signing_key=sk, **arrays)
    got = P.read_pack(path, trusted, base_fingerprint=FP, runtime_version="0.1.0")
    assert got.manifest == written
    m = got.manifest
    assert (m.task_id, m.version, m.method, m.prompt_tokens, m.lora_rank) == ("bend", 3, "kaizen", 4, 2)
    assert m.signing_key_id == K.key_id(sk) and re.fullmatch(r"[0-9a-f]{16}", m.signing_key_id)
    assert m.metrics == {"acc": 0.75} and m.instructions == arrays["instructions"]
    assert set(m.sha256) == {"prompt.npy", "key.npy", "text_emb.npy", "adapter.npz", "answers.json",
                             "golden/golden.json", "golden/0.png"}
    np.testing.assert_array_equal(got.prompt, arrays["prompt"])
    np.testing.assert_array_equal(got.key, arrays["key"])
    np.testing.assert_array_equal(got.text_emb, arrays["text_emb"])
    assert set(got.lora) == set(arrays["lora"])
    for name, array in arrays["lora"].items():
        np.testing.assert_array_equal(got.lora[name], array)
        assert got.lora[name].dtype == np.float32
    assert got.answers == ["yes", "no"]
    assert got.golden == golden
    assert P.verify_pack(path, trusted) == written
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file


def test_pack_is_a_plain_deterministic_tar(tmp_path, sk):
    a, b = tmp_path / "a.kpk", tmp_path / "b.kpk"
    for path in (a, b):
        write_test_pack(path, "pick", 1, sk, created_at="2025-01-01T00:00:00+00:00")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a, "r:") as tf:
        assert all(m.isreg() for m in tf.getmembers())
        assert {"manifest.json", "manifest.sig", "adapter.npz"} <= set(tf.getnames())


def test_manifest_json_round_trip_and_field_errors(good):
    manifest = P.Manifest.from_json(members_of(good)[P.MANIFEST])
    assert P.Manifest.from_json(manifest.to_json()) == manifest
    data = manifest.to_dict()
    for field, value in [("version", 0), ("task_id", "Bad Name"), ("created_at", "yesterday"),
                         ("min_runtime_version", "1.0"), ("instructions", []), ("signing_key_id", "xyz"),
                         ("sha256", {"prompt.npy": "nothex"}), ("schema_version", 99)]:
        with pytest.raises(ValueError, match=f"field '{field}'"):
            P.Manifest.from_dict(dict(data, **{field: value}))
    with pytest.raises(ValueError, match="field 'method': missing"):
        P.Manifest.from_dict({k: v for k, v in data.items() if k != "method"})
    with pytest.raises(ValueError, match="field 'extra': unknown"):
        P.Manifest.from_dict(dict(data, extra=1))


# ---- refusals: the tar itself ----------------------------------------------------------------

def test_not_a_tar(tmp_path, good, trusted):
    import gzip

    junk = tmp_path / "junk.kpk"
    junk.write_bytes(b"hello, not a pack" * 100)
    refused(junk, trusted, "not a tar archive")
    gz = tmp_path / "gz.kpk"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    refused(gz, trusted, "not a tar archive")
    empty = tmp_path / "empty.kpk"
    empty.write_bytes(b"")
    refused(empty, trusted, "not a tar archive")


def _end_of_data(data):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("cut", ["header", "data", "half", "no-end-marker", "half-end-marker"])
def test_truncated_tar(tmp_path, good, trusted, cut):
    data = good.read_bytes()
    end = _end_of_data(data)
    n = {"header": 700, "data": 1536 + 100, "half": len(data) // 2, "no-end-marker": end,
         "half-end-marker": end + 512}[cut]
    short = tmp_path / "short.kpk"
    short.write_bytes(data[:n])
    refused(short, trusted, "truncated tar")


def test_corrupt_header_mid_archive(tmp_path, good, trusted):
    data = bytearray(good.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:") as tf:
        second = tf.getmembers()[1]
    data[second.offset + 10] ^= 0xFF  # its header checksum no longer matches
    bad = tmp_path / "corrupt.kpk"
    bad.write_bytes(bytes(data))
    refused(bad, trusted, "truncated tar .*incomplete or corrupt")


def test_padding_after_end_marker_is_not_needed(tmp_path, good, trusted):
    data = good.read_bytes()
    short = tmp_path / "short.kpk"
    short.write_bytes(data[:_end_of_data(data) + 1024])
    assert P.read_pack(short, trusted).manifest.version == 1


def _tar_with(entries):
    """entries: list of (TarInfo, bytes | None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("entry, reason", [
    (_member("../evil.npy"), r"unsafe member \.\./evil\.npy: path traversal"),
    (_member("golden/../../evil"), "path traversal"),
    (_member("/etc/passwd"), "unsafe member /etc/passwd: absolute path"),
    (_member("prompt.npy", kind=tarfile.SYMTYPE, link="/etc/passwd"), "unsafe member prompt.npy: symbolic link"),
    (_member("key.npy", kind=tarfile.LNKTYPE, link="manifest.json"), "unsafe member key.npy: hard link"),
    (_member("dev", kind=tarfile.CHRTYPE), "unsafe member dev: character device"),
    (_member("fifo", kind=tarfile.FIFOTYPE), "unsafe member fifo: fifo"),
])
def test_unsafe_members_refused_before_anything_is_written(tmp_path, good, trusted, entry, reason):
    members = members_of(good)
    entries = [_member(n, d) for n, d in members.items()] + [entry]
    bad = tmp_path / "bad.kpk"
    bad.write_bytes(_tar_with(entries))
    refused(bad, trusted, reason)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.kpk", "pick-1.kpk"]


def test_duplicate_member(tmp_path, good, trusted):
    members = members_of(good)
    entries = [_member(n, d) for n, d in members.items()] + [_member("prompt.npy", npy_bytes(np.zeros(3)))]
    bad = tmp_path / "dup.kpk"
    bad.write_bytes(_tar_with(entries))
    refused(bad, trusted, "duplicate member prompt.npy")


def test_member_too_large(good, trusted):
    refused(good, trusted, r"member \S+ too large", limits=TarLimits(max_member_bytes=100))
    refused(good, trusted, "pack too large", limits=TarLimits(max_total_bytes=1000))


def test_missing_and_unexpected_members(tmp_path, good, trusted):
    members = members_of(good)
    for name in ("prompt.npy", "key.npy", "text_emb.npy", "adapter.npz", "manifest.json"):
        path = write_members(tmp_path / f"no-{name}.kpk", {n: d for n, d in members.items() if n != name})
        refused(path, trusted, f"missing member {re.escape(name)}")
    path = write_members(tmp_path / "extra.kpk", dict(members, **{"notes.txt": b"hi"}))
    refused(path, trusted, "unexpected member notes.txt")
    # An optional member dropped: the manifest still lists it.
    path = write_members(tmp_path / "no-answers.kpk", {n: d for n, d in members.items() if n != "answers.json"})
    refused(path, trusted, r"missing member answers.json \(listed in the manifest\)")


# ---- refusals: signature and manifest --------------------------------------------------------

def test_unsigned(tmp_path, good, trusted):
    path = write_members(tmp_path / "unsigned.kpk",
                         {n: d for n, d in members_of(good).items() if n != P.SIGNATURE})
    refused(path, trusted, r"unsigned \(no manifest.sig\)")


def test_unknown_key(tmp_path, good):
    other = K.TrustedKeys([K.generate_signing_key().public_key()])
    msg = refused(good, other, "signed by unknown key [0-9a-f]{16}")
    assert other.ids[0] in msg


def test_bad_signature(tmp_path, good, trusted):
    members = members_of(good)
    flipped = bytes([members[P.SIGNATURE][0] ^ 1]) + members[P.SIGNATURE][1:]
    refused(write_members(tmp_path / "flip.kpk", dict(members, **{P.SIGNATURE: flipped})), trusted,
            "bad signature: manifest.json does not match")
    edited = members[P.MANIFEST].replace(b'"version": 1', b'"version": 9')
    assert edited != members[P.MANIFEST]
    refused(write_members(tmp_path / "edit.kpk", dict(members, **{P.MANIFEST: edited})), trusted,
            "bad signature")
    refused(write_members(tmp_path / "short.kpk", dict(members, **{P.SIGNATURE: b"abc"})), trusted,
            r"bad signature \(manifest.sig is 3 bytes")


def test_malformed_manifest_names_the_field(tmp_path, sk, good, trusted):
    members = members_of(good)
    data = json.loads(members[P.MANIFEST])
    cases = [({"version": "two"}, "field 'version'"), ({"task_id": "../x"}, "field 'task_id'"),
             ({"prompt_tokens": -1}, "field 'prompt_tokens'"), ({"metrics": [1]}, "field 'metrics'"),
             ({"bonus": True}, "field 'bonus': unknown field")]
    for i, (change, field) in enumerate(cases):
        body = json.dumps(dict(data, **change)).encode()
        refused(resigned(tmp_path / f"m{i}.kpk", sk, members, body), trusted, f"malformed manifest: {field}")
    body = json.dumps({k: v for k, v in data.items() if k != "created_at"}).encode()
    refused(resigned(tmp_path / "mc.kpk", sk, members, body), trusted,
            "malformed manifest: field 'created_at': missing")
    refused(resigned(tmp_path / "mj.kpk", sk, members, b"{not json"), trusted, "malformed manifest")


def test_tampered_member_is_named(tmp_path, good, trusted):
    members = members_of(good)
    for name in ("prompt.npy", "adapter.npz", "golden/1.png"):
        data = bytearray(members[name])
        data[-1] ^= 0xFF
        path = write_members(tmp_path / "t.kpk", dict(members, **{name: bytes(data)}))
        refused(path, trusted, f"tampered: member {re.escape(name)} does not match its sha256")


def test_wrong_base_and_old_runtime(tmp_path, sk, good, trusted):
    refused(good, trusted, f"wrong base: pack built for base {FP}, this station runs base other",
            base_fingerprint="other")
    future = write_test_pack(tmp_path / "f.kpk", "pick", 1, sk, base_fingerprint=FP, min_runtime_version="9.0.0")
    assert future.min_runtime_version == "9.0.0"
    refused(tmp_path / "f.kpk", trusted, r"runtime too old: pack needs runtime >= 9.0.0, this is 0.1.0",
            runtime_version="0.1.0")
    assert P.read_pack(tmp_path / "f.kpk", trusted, runtime_version="9.0.0").manifest.version == 1


def test_a_newer_packs_unknown_member_reads_as_runtime_too_old(tmp_path, sk, trusted, good):
    """A member from a later runtime, signed and hashed, in a pack that declares that runtime: the
    version is checked first, so the station says what to do (upgrade), not "damaged pack"."""
    members = {n: d for n, d in members_of(good).items() if n not in (P.MANIFEST, P.SIGNATURE)}
    manifest = json.loads(members_of(good)[P.MANIFEST])
    fields = {k: v for k, v in manifest.items() if k not in ("sha256", "signing_key_id")}
    for min_runtime, match in (("9.0.0", r"runtime too old: pack needs runtime >= 9.0.0"),
                               ("0.1.0", r"unexpected member future\.npy")):
        path = tmp_path / f"future-{min_runtime}.kpk"
        P.write_signed_pack(path, dict(fields, min_runtime_version=min_runtime),
                            dict(members, **{"future.npy": npy_bytes(np.zeros(3, np.float32))}), sk)
        refused(path, trusted, match, runtime_version="0.2.0")


# ---- refusals: arrays ------------------------------------------------------------------------

def test_bad_arrays_refused_even_when_signed(tmp_path, sk, good, trusted):
    contents = P.read_pack(good, trusted)
    base = {n: d for n, d in members_of(good).items() if n not in (P.MANIFEST, P.SIGNATURE)}
    lora = dict(contents.lora)
    nan_prompt = contents.prompt.copy()
    nan_prompt[0, 0] = np.nan
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        ({"prompt.npy": npy_bytes(contents.prompt.astype(np.float64))}, r"bad array prompt.npy: dtype float64"),
        ({"prompt.npy": npy_bytes(contents.prompt[0])}, r"bad array prompt.npy: 1 dimensions"),
        ({"prompt.npy": npy_bytes(contents.prompt[:1])}, r"bad array prompt.npy: shape \[1, 8\], axis 0"),
        ({"prompt.npy": npy_bytes(nan_prompt)}, r"bad array prompt.npy: contains NaN"),
        ({"prompt.npy": obj.getvalue()}, r"bad array prompt.npy: not a readable .npy array without pickle"),
        ({"key.npy": npy_bytes(contents.key * 2)}, r"bad array key.npy: norm 2.0000"),
        ({"text_emb.npy": npy_bytes(contents.text_emb[:, :3])}, r"bad array text_emb.npy: shape"),
        ({"adapter.npz": npz_bytes({k: v for k, v in lora.items() if not k.endswith("q_proj.B")})},
         r"bad array adapter.npz\[lora.0.q_proj.A\]: its pair lora.0.q_proj.B is missing"),
        ({"adapter.npz": npz_bytes(dict(lora, weird=lora["lora.0.q_proj.A"]))},
         r"bad array adapter.npz\[weird\]: name must look like"),
        ({"adapter.npz": b"PK not a zip"}, r"bad array adapter.npz: not an .npz"),
        ({"answers.json": b'["yes", "yes"]'}, r"bad member answers.json: has duplicate answers"),
        ({"golden/1.png": b"GIF89a"}, r"bad member golden/1.png: not a PNG"),
    ]
    for i, (change, reason) in enumerate(cases):
        path = with_files(tmp_path / f"a{i}.kpk", sk, contents.manifest, dict(base, **change))
        refused(path, trusted, reason)


def test_build_pack_refuses_bad_arrays(tmp_path, sk):
    arrays = make_arrays()
    bad = dict(arrays, prompt=arrays["prompt"].astype(np.float64))
    with pytest.raises(PackError, match=r"cannot write pack .*x.kpk: prompt.npy: dtype float64"):
        P.build_pack(tmp_path / "x.kpk", task_id="t", version=1, method="m", base_fingerprint=FP,
                     signing_key=sk, **bad)
    with pytest.raises(PackError, match="field 'version'"):
        P.build_pack(tmp_path / "x.kpk", task_id="t", version=0, method="m", base_fingerprint=FP,
                     signing_key=sk, **arrays)
    assert not list(tmp_path.iterdir())


# ---- keys and rotation -----------------------------------------------------------------------

def test_key_rotation_two_trusted_keys_and_resign(tmp_path, sk):
    new = K.generate_signing_key()
    both = K.TrustedKeys([sk.public_key(), new.public_key()])
    only_new = K.TrustedKeys([new.public_key()])
    old_pack, new_pack = tmp_path / "old.kpk", tmp_path / "new.kpk"
    write_test_pack(old_pack, "pick", 1, sk)
    write_test_pack(new_pack, "pick", 2, new)
    assert P.verify_pack(old_pack, both).signing_key_id == K.key_id(sk)
    assert P.verify_pack(new_pack, both).signing_key_id == K.key_id(new)
    refused(old_pack, only_new, "signed by unknown key")
    moved = P.resign_pack(old_pack, tmp_path / "old-resigned.kpk", new, both)
    assert moved.signing_key_id == K.key_id(new)
    before, after = P.read_pack(old_pack, both), P.read_pack(tmp_path / "old-resigned.kpk", only_new)
    assert after.manifest.sha256 == before.manifest.sha256
    np.testing.assert_array_equal(after.prompt, before.prompt)
    with pytest.raises(PackError, match="signed by unknown key"):  # re-signing checks the old signature
        P.resign_pack(old_pack, tmp_path / "x.kpk", new, only_new)
    unsigned = write_members(tmp_path / "unsigned.kpk",
                             {n: d for n, d in members_of(old_pack).items() if n != P.SIGNATURE})
    P.resign_pack(unsigned, unsigned, new, None)  # explicit: no old signature to check
    assert P.verify_pack(unsigned, only_new).signing_key_id == K.key_id(new)
    tampered = dict(members_of(old_pack), **{"key.npy": b"\x93NUMPY junk"})
    with pytest.raises(PackError, match="tampered: member key.npy"):  # hashes are checked regardless
        P.resign_pack(write_members(tmp_path / "t.kpk", tampered), tmp_path / "t2.kpk", new, None)


def test_signing_key_files(tmp_path):
    key = K.generate_signing_key()
    secret, public = K.save_signing_key(key, tmp_path / "keys", "trainer")
    assert secret.name == "trainer.ed25519.key" and public.name == "trainer.ed25519.pub"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert K.key_id(K.load_signing_key(secret)) == K.key_id(key) == K.key_id(K.load_public_key(public))
    with pytest.raises(ConfigError, match="exists"):
        K.save_signing_key(key, tmp_path / "keys", "trainer")
    K.save_signing_key(K.generate_signing_key(), tmp_path / "keys", "second")
    trusted = K.TrustedKeys.from_paths([tmp_path / "keys"])
    assert len(trusted) == 2 and K.key_id(key) in trusted
    garbage = tmp_path / "garbage.ed25519.pub"
    garbage.write_text("nope")
    with pytest.raises(ConfigError, match=re.escape(str(garbage))):
        K.load_public_key(garbage)
    with pytest.raises(ConfigError, match=re.escape(str(public))):
        K.load_signing_key(public)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: no \*\.ed25519\.pub files"):
        K.TrustedKeys.from_paths([tmp_path / "empty"])


def test_curve_keys_cli(tmp_path, capsys):
    import zmq

    assert K.cli_gen(["--kind", "curve", "--out", str(tmp_path), "--name", "station-07"]) == 0
    secret, public = tmp_path / "station-07.key", tmp_path / "station-07.pub"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = K.load_curve_keypair(secret)
    assert len(pub) == len(sec) == 40 and pub == K.load_curve_public(public)
    assert zmq.curve_public(sec) == pub
    public.write_bytes(zmq.curve_keypair()[0] + b"\n")
    with pytest.raises(ConfigError, match="does not match the secret key"):
        K.load_curve_keypair(secret)
    public.write_text("short")
    with pytest.raises(ConfigError, match=f"{re.escape(str(public))}: expected 40 z85"):
        K.load_curve_public(public)
    assert K.cli_gen(["--kind", "signing", "--out", str(tmp_path), "--name", "hub"]) == 0
    assert "signing key id" in capsys.readouterr().out
    assert K.load_signing_key(tmp_path / "hub.ed25519.key")


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_inspect_verify_sign(tmp_path, sk, good, capsys):
    from kaizen.runtime import cli

    K.save_signing_key(sk, tmp_path / "old", "old")
    new = K.generate_signing_key()
    K.save_signing_key(new, tmp_path / "new", "new")
    assert pack_cli.cli_inspect([str(good)]) == 0
    out = capsys.readouterr().out
    assert '"task_id": "pick"' in out and "prompt.npy" in out and "[3, 8]" in out
    assert pack_cli.cli_inspect([str(good), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arrays"]["prompt.npy"] == {"dtype": "float32", "shape": [3, 8]}
    assert cli.main(["pack", "verify", str(good), "--trust", str(tmp_path / "old")]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["pack", "verify", str(good), "--trust", str(tmp_path / "old"),
                     "--base-fingerprint", "elsewhere"]) == 1
    assert "wrong base" in capsys.readouterr().err
    assert cli.main(["pack", "verify", str(good), "--trust", str(tmp_path / "new")]) == 1
    assert "signed by unknown key" in capsys.readouterr().err
    out_pack = tmp_path / "resigned.kpk"
    assert cli.main(["pack", "sign", str(good), "--key", str(tmp_path / "new" / "new.ed25519.key"),
                     "--trust", str(tmp_path / "old"), "--out", str(out_pack)]) == 0
    assert cli.main(["pack", "verify", str(out_pack), "--trust", str(tmp_path / "new" / "new.ed25519.pub")]) == 0
    capsys.readouterr()
    assert cli.main(["pack", "sign", str(good), "--key", str(tmp_path / "new" / "new.ed25519.key"),
                     "--trust", str(tmp_path / "new")]) == 1  # old signature not trusted: refused
    assert "signed by unknown key" in capsys.readouterr().err


# ---- the spec document -----------------------------------------------------------------------

def test_taskpack_md_matches_the_code():
    doc = (ROOT / "runtime" / "TASKPACK.md").read_text()
    heading = doc.splitlines()[0]
    match = re.fullmatch(r"# Task pack format, schema version (\d+)", heading)
    assert match, heading
    assert int(match.group(1)) == P.PACK_SCHEMA_VERSION
    table_fields = set(re.findall(r"^\| `([a-z_0-9]+)` \|", doc, flags=re.MULTILINE))
    for field in REQUIRED_FIELDS:
        assert field in table_fields, f"manifest field {field} is not documented in TASKPACK.md"
    for member in (*P.REQUIRED_FILES, "answers.json", "golden/golden.json", P.MANIFEST, P.SIGNATURE):
        assert f"`{member}`" in doc
    for reason in ("not a tar archive", "truncated tar", "path traversal", "absolute path", "too large",
                   "duplicate member", "unexpected member", "missing member", "unsigned",
                   "signed by unknown key", "bad signature", "malformed manifest", "tampered",
                   "wrong base", "runtime too old", "bad array"):
        assert reason in doc, reason
