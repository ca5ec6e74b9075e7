"""Benchmark: hostile task packs delivered to a real station daemon (issue 11).

    .venv/bin/python bench/fuzz_packs.py [--deadline 120]

A real hub and one station daemon (hub/fleet_sim.Fleet: CURVE, SQLite, a PackStore with one
active pack) on loopback, threads in this process. Each hostile kind (60, below) is a .kpk
registered in the hub's catalogue as its own task and published to the station, fetched, and
installed through the daemon's install path. The hub's own checks (publish-time verification
and the rescan that stops serving unreadable files) are switched off in this bench (Hub._refresh
replaced) so that every kind reaches the station: what is measured is the station, which must
not rely on the hub. Then a valid pack is published as a control.

Per kind: the state the hub shows (must be `rejected`, with a reason that names the file),
whether the daemon thread survived, and whether the rejection was an ordinary refusal or an
"internal error" (an unexpected exception: must be 0). Over the run: crashes/hangs (daemon dead,
a kind with no report before the deadline), store unchanged (active.json bytes, packs/ listing,
active set, staging/ empty), installs that got past step "begin" (store_disk fault hook: a
staging folder is only created after the signature, every hash and every content check passed,
so 0 means nothing was written for any hostile pack). Prints a Markdown table, writes
reports/bench/fuzz_packs.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, write_report

from kaizen.hub.db import HubDB, PackRecord
from kaizen.hub.fleet_sim import Fleet, wait_until
from kaizen.runtime import pack as P
from kaizen.runtime import store_disk
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.pack_arrays import npy_bytes, npz_bytes
from kaizen.runtime.tarsafe import read_members, tar_bytes
from kaizen.runtime.testpacks import write_test_pack

FP = "fuzz-packs-base"


# ---- raw tar pieces ---------------------------------------------------------------------------

def header(name: bytes, size: int | bytes = 0, kind: bytes = b"0", magic: bytes = b"ustar\x0000",
           checksum: bool = True) -> bytes:
    """One 512-byte tar header; `size` an int (octal) or the raw 12-byte field."""
    h = bytearray(512)
    h[0:min(len(name), 100)] = name[:100]
    h[100:108] = b"0000644\0"
    h[124:136] = size if isinstance(size, bytes) else b"%011o\0" % size
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[257:257 + len(magic)] = magic
    if checksum:
        h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return header(name, len(data), kind) + data + bytes(-len(data) % 512)


def raw_tar(*parts: bytes) -> bytes:
    return b"".join(parts) + bytes(1024)


def ordered_tar(members: dict[str, bytes], order: list[str]) -> bytes:
    return raw_tar(*(member(n.encode(), members[n]) for n in order))


# ---- the kinds ----------------------------------------------------------------------------------

class Kinds:
    """Every hostile kind as name -> bytes, built from one valid signed pack."""

    def __init__(self, folder: Path, sk, stranger):
        self.folder, self.sk, self.stranger = folder, sk, stranger
        self.trusted = TrustedKeys([sk])
        write_test_pack(folder / "base.kpk", "pick", 2, sk, base_fingerprint=FP, golden=1)
        self.good = (folder / "base.kpk").read_bytes()
        self.members = read_members(folder / "base.kpk")
        self.manifest = P.read_pack(folder / "base.kpk", self.trusted).manifest
        self.files = {n: d for n, d in self.members.items() if n not in ("manifest.json", "manifest.sig")}

    def signed(self, files: dict[str, bytes] | None = None, key=None, **fields) -> bytes:
        """A correctly hashed pack signed by `key` (the trusted one by default)."""
        base = {k: v for k, v in self.manifest.to_dict().items() if k not in ("sha256", "signing_key_id")}
        path = self.folder / "tmp.kpk"
        P.write_signed_pack(path, {**base, **fields}, self.files if files is None else files, key or self.sk)
        return path.read_bytes()

    def with_files(self, **changes) -> bytes:
        return self.signed({**self.files, **{k.replace("__", "/").replace("_dot_", "."): v
                                             for k, v in changes.items()}})

    def manifest_signed(self, body: bytes, key=None) -> bytes:
        return tar_bytes({**self.files, "manifest.json": body, "manifest.sig": (key or self.sk).sign(body)})

    def all(self) -> dict[str, bytes]:
        m, good, files = self.members, self.good, self.files
        manifest = m["manifest.json"]
        sig_header = 512 + -(-len(manifest) // 512) * 512  # offset of manifest.sig's header
        end = _end_of_data(good)  # the writer pads the archive to 10 KiB records: cut before the marker
        kinds: dict[str, Callable[[], bytes]] = {
            # -- the file itself
            "random bytes": lambda: np.random.default_rng(1).bytes(20_000),
            "gzip-compressed pack": lambda: gzip.compress(good),
            "empty file": lambda: b"",
            "truncated in the first header": lambda: good[:300],
            "truncated in the manifest": lambda: good[:700],
            "truncated mid-archive": lambda: good[:len(good) // 2],
            "no end-of-archive marker": lambda: good[:end],
            "half an end-of-archive marker": lambda: good[:end + 512],
            "corrupt header checksum": lambda: _flip(good, sig_header + 10),
            "zip file named .kpk": lambda: _zip({"manifest.json": manifest}),
            # -- hostile tar headers
            "negative base-256 size": lambda: raw_tar(header(b"manifest.json", b"\xff" * 12)),
            "huge base-256 size": lambda: raw_tar(header(b"manifest.json", b"\x80" + b"\x7f" * 11)),
            "non-octal size field": lambda: raw_tar(header(b"manifest.json", b"12345678x\0\0\0")),
            "size beyond the file": lambda: raw_tar(header(b"manifest.json", 10**9)),
            "PAX header with a 1000-level path": lambda: _pax_deep(),
            "PAX global header": lambda: raw_tar(member(b"pax_global_header", b"20 comment=hello\n", b"g")),
            "GNU long name of 1 GiB": lambda: raw_tar(header(b"././@LongLink", 1 << 30, b"L")),
            "GNU long link name": lambda: raw_tar(member(b"././@LongLink", b"x" * 600, b"K")),
            "GNU sparse member": lambda: raw_tar(member(b"manifest.json", manifest, b"S")),
            "symbolic link": lambda: raw_tar(header(b"manifest.json", 0, b"2")),
            "hard link": lambda: raw_tar(header(b"manifest.json", 0, b"1")),
            "character device": lambda: raw_tar(header(b"dev", 0, b"3")),
            "block device": lambda: raw_tar(header(b"disk", 0, b"4")),
            "fifo": lambda: raw_tar(header(b"fifo", 0, b"6")),
            "contiguous file": lambda: raw_tar(member(b"manifest.json", manifest, b"7")),
            "unknown entry type": lambda: raw_tar(member(b"manifest.json", manifest, b"Z")),
            "absolute member path": lambda: raw_tar(member(b"/etc/kaizen/manifest.json", manifest)),
            "path traversal": lambda: raw_tar(member(b"../../manifest.json", manifest)),
            "40-level ustar path": lambda: raw_tar(member(b"d/" * 40 + b"x", b"x")),
            "backslash in a name": lambda: raw_tar(member(b"golden\\..\\x.png", b"x")),
            "name not UTF-8": lambda: raw_tar(member(b"\xff\xfe.npy", b"x")),
            "20,000 directory entries": lambda: raw_tar(*(header(b"d%06d/" % i, 0, b"5") for i in range(20_000))),
            "2,000 empty members, no manifest first": lambda: raw_tar(*(member(b"f%05d" % i, b"") for i in range(2000))),
            "not ustar magic": lambda: raw_tar(header(b"manifest.json", 0, magic=b"nope\0\0")),
            # -- signature first
            "old member order (manifest not first)": lambda: ordered_tar(m, sorted(m)),
            "no manifest.json": lambda: tar_bytes({n: d for n, d in m.items() if n != "manifest.json"}),
            "manifest second": lambda: ordered_tar(m, ["manifest.sig", "manifest.json", *files]),
            "unsigned": lambda: tar_bytes({n: d for n, d in m.items() if n != "manifest.sig"}),
            "empty signature": lambda: tar_bytes({**m, "manifest.sig": b""}),
            "3-byte signature": lambda: tar_bytes({**m, "manifest.sig": b"abc"}),
            "signature of 1 MiB": lambda: tar_bytes({**m, "manifest.sig": bytes(1 << 20)}),
            "flipped signature bit": lambda: tar_bytes({**m, "manifest.sig": bytes([m["manifest.sig"][0] ^ 1])
                                                        + m["manifest.sig"][1:]}),
            "signed by an unknown key": lambda: self.signed(key=self.stranger),
            "manifest edited after signing": lambda: tar_bytes({**m, "manifest.json": manifest.replace(
                b'"version": 2', b'"version": 9')}),
            "manifest claims another key id": lambda: self.manifest_signed(manifest.replace(
                self.manifest.signing_key_id.encode(), b"0123456789abcdef")),
            "manifest nested 100,000 deep (unsigned)": lambda: tar_bytes({"manifest.json": b"[" * 100_000}),
            "manifest nested 100,000 deep (signed)": lambda: self.manifest_signed(b"[" * 100_000 + b"]" * 100_000),
            "manifest of 2 MiB": lambda: self.manifest_signed(b" " * (2 << 20) + manifest),
            "manifest with NaN (signed)": lambda: self.manifest_signed(manifest.replace(
                b'"accuracy": 0.9', b'"accuracy": NaN')),
            "manifest not JSON (signed)": lambda: self.manifest_signed(b"{not json"),
            "manifest unknown field (signed)": lambda: self.manifest_signed(manifest.replace(
                b'{\n', b'{\n  "bonus": 1,\n', 1)),
            # -- signed by the trusted key, hostile after the signature
            "tampered member": lambda: tar_bytes({**m, "prompt.npy": m["prompt.npy"][:-1] + b"\x01"}),
            "member not in the manifest": lambda: tar_bytes({**m, "golden/evil.png": b"\x89PNG\r\n\x1a\n"}),
            "listed member missing": lambda: tar_bytes({n: d for n, d in m.items() if n != "answers.json"}),
            "duplicate member": lambda: ordered_tar(m, ["manifest.json", "manifest.sig", *files, "prompt.npy"]),
            "wrong base": lambda: self.signed(base_fingerprint="another-base"),
            "runtime too old": lambda: self.signed(min_runtime_version="99.0.0"),
            "prompt float64": lambda: self.with_files(prompt_dot_npy=npy_bytes(
                np.zeros((3, 8), np.float64))),
            "prompt with NaN": lambda: self.with_files(prompt_dot_npy=npy_bytes(
                np.full((3, 8), np.nan, np.float32))),
            "npy header claims 960 GB": lambda: self.with_files(prompt_dot_npy=_huge_npy()),
            "object-dtype npy (pickle)": lambda: self.with_files(prompt_dot_npy=_pickled_npy()),
            "key not unit norm": lambda: self.with_files(key_dot_npy=npy_bytes(np.full(6, 2.0, np.float32))),
            "adapter.npz not a zip": lambda: self.with_files(adapter_dot_npz=b"PK not a zip"),
            "adapter.npz encrypted entry": lambda: self.with_files(adapter_dot_npz=_npz(encrypted=True)),
            "adapter.npz bzip2 entry": lambda: self.with_files(adapter_dot_npz=_npz(zipfile.ZIP_BZIP2)),
            "adapter.npz lzma entry": lambda: self.with_files(adapter_dot_npz=_npz(zipfile.ZIP_LZMA)),
            "adapter.npz zip bomb (declared 600 MiB)": lambda: self.with_files(adapter_dot_npz=_npz_bomb()),
            "adapter.npz entry not .npy": lambda: self.with_files(adapter_dot_npz=_zip({"x.txt": b"hi"})),
            "adapter.npz missing LoRA pair": lambda: self.with_files(adapter_dot_npz=npz_bytes(
                {"lora.0.q_proj.A": np.zeros((2, 8), np.float32)})),
            "answers.json nested 50,000 deep": lambda: self.with_files(answers_dot_json=b"[" * 50_000),
            "answers.json duplicates": lambda: self.with_files(answers_dot_json=b'["yes", "yes"]'),
            "golden image not a PNG": lambda: self.with_files(golden__0_dot_png=b"GIF89a"),
        }
        return {name: make() for name, make in kinds.items()}


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _end_of_data(data: bytes) -> int:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npz(compression=zipfile.ZIP_STORED, encrypted=False) -> bytes:
    data = bytearray(_zip({"lora.0.q_proj.A.npy": npy_bytes(np.zeros((2, 8), np.float32))}, compression))
    if encrypted:
        for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            data[data.index(sig) + off] |= 1
    return bytes(data)


def _npz_bomb() -> bytes:
    """A small zip whose entry declares 600 MiB once unpacked (local and central headers patched)."""
    data = bytearray(_zip({"lora.0.q_proj.A.npy": npy_bytes(np.zeros((2, 8), np.float32))}, zipfile.ZIP_DEFLATED))
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(sig) + off
        data[at:at + 4] = (600 << 20).to_bytes(4, "little")
    return bytes(data)


def _huge_npy() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (300000, 800000)})
    return buf.getvalue() + bytes(96)


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _pax_deep() -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a/" * 1000 + "manifest.json")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


# ---- the run ------------------------------------------------------------------------------------

def store_fingerprint(root: Path) -> dict:
    return {"active.json": (root / "active.json").read_bytes().decode(),
            "packs": sorted(str(p.relative_to(root)) for p in (root / "packs").rglob("*")),
            "staging": sorted(p.name for p in (root / "staging").iterdir())}


def run(deadline: float) -> dict:
    steps: list[str] = []
    store_disk.set_fault_hook(steps.append)
    with tempfile.TemporaryDirectory(prefix="kzfuzzpacks") as tmp:
        tmp = Path(tmp)
        sk, stranger = generate_signing_key(), generate_signing_key()
        kinds = Kinds(tmp, sk, stranger).all()
        shas = Counter(hashlib.sha256(d).hexdigest() for d in kinds.values())
        assert all(n == 1 for n in shas.values()), "two kinds have the same bytes"
        fleet = Fleet(tmp / "fleet", 1, TrustedKeys([sk]), FP)
        try:
            write_test_pack(tmp / "pick-1.kpk", "pick", 1, sk, base_fingerprint=FP)
            store = fleet.store(0)
            store.install(tmp / "pick-1.kpk")
            before, active_before = store_fingerprint(store.root), store.active()
            hub = fleet.start_hub()
            hub._refresh = lambda db: None  # the station is under test, not the hub's filters
            daemon = fleet.start_station(0)
            packs_dir = fleet.hub_config.packs_dir
            packs_dir.mkdir(parents=True, exist_ok=True)
            names = {}
            db = HubDB(fleet.hub_config.db_path)
            del steps[:]
            t0 = time.monotonic()
            for i, (kind, data) in enumerate(kinds.items()):
                name = f"hostile-{i:03d}.kpk"
                (packs_dir / name).write_bytes(data)
                db.add_pack(PackRecord(name, hashlib.sha256(data).hexdigest(), len(data), f"h{i:03d}", 1,
                                       str(packs_dir / name)))
                db.publish("*", name)
                names[name] = kind

            def states() -> dict:
                return {n: p for n, p in fleet.status()[0]["packs"].items() if n in names}

            wait_until(lambda: all(p["state"] == "rejected" for p in states().values())
                       and len(states()) == len(names), deadline, step=0.5)
            seconds = time.monotonic() - t0
            final = states()
            alive = daemon._thread.is_alive()
            after = store_fingerprint(store.root)
            unchanged = after == before and store.active() is active_before
            hostile_steps = list(steps)
            # control: a valid pack after all of them still activates
            write_test_pack(tmp / "pick-2.kpk", "pick", 2, sk, base_fingerprint=FP)
            control = fleet.publish(tmp / "pick-2.kpk", "*")
            control_ok = wait_until(lambda: fleet.installed(0).get("pick") == 2, 60)
            db.close()
            rows = []
            for name, kind in names.items():
                p = final.get(name, {"state": "no report", "reason": ""})
                reason = p["reason"] or ""
                rows.append({"kind": kind, "bytes": len(kinds[kind]), "state": p["state"],
                             "internal": "internal error" in reason,
                             "names_file": name in reason, "reason": reason[:300]})
            return {"kinds": len(rows), "seconds": round(seconds, 1), "daemon_alive": alive,
                    "hangs": sum(r["state"] != "rejected" for r in rows),
                    "internal_errors": sum(r["internal"] for r in rows),
                    "reasons_naming_the_file": sum(r["names_file"] for r in rows),
                    "store_unchanged": unchanged, "store_before": before, "store_after": after,
                    "installs_past_begin": sum(s != "begin" for s in hostile_steps),
                    "install_steps": Counter(hostile_steps), "daemon_stats": {
                        "dropped": daemon.stats.dropped, "loop_errors": daemon.stats.loop_errors},
                    "control_pack": control, "control_activated": control_ok, "rows": rows}
        finally:
            fleet.close()
            store_disk.set_fault_hook(None)


def table(r: dict) -> str:
    lines = ["| kind | bytes | hub state | reason (start) |", "|---|---|---|---|"]
    for row in r["rows"]:
        reason = row["reason"].split(" refused: ", 1)[-1][:70].replace("|", "/")
        lines.append(f"| {row['kind']} | {row['bytes']} | {row['state']}{' (INTERNAL)' if row['internal'] else ''} "
                     f"| {reason} |")
    crashes = int(not r["daemon_alive"])
    lines += ["", "| surface | hostile inputs | crashes / hangs | `internal` | store |", "|---|---|---|---|---|",
              f"| hostile packs via daemon | {r['kinds']} kinds | {crashes} / {r['hangs']} | {r['internal_errors']} "
              f"| {'unchanged' if r['store_unchanged'] else 'CHANGED'}, installs past 'begin' (anything "
              f"written): {r['installs_past_begin']} |",
              "", f"{r['reasons_naming_the_file']}/{r['kinds']} reasons name the file; control pack activated "
              f"after them: {r['control_activated']}; {r['seconds']} s for all kinds"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds for every kind to be reported")
    a = ap.parse_args(argv)
    result = run(a.deadline)
    print(table(result))
    path = write_report("fuzz_packs", {**result, "machine": load()})
    print(f"wrote {path}")
    ok = (result["daemon_alive"] and result["hangs"] == 0 and result["internal_errors"] == 0
          and result["store_unchanged"] and result["installs_past_begin"] == 0 and result["control_activated"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
