"""Benchmark: hostile messages against the inference endpoint and the hub (issue 11).

    .venv/bin/python bench/fuzz.py [--n 10000] [--seed 0]

Endpoint: an InferenceServer on ipc (1 MiB message limit) in front of a tiny backend that acts
like a station where it matters (it UTF-8-encodes the instruction like a tokenizer and opens
encoded images with PIL, pixel limit included). Hub: a real Hub (hub/fleet_sim.Fleet keys and
config, CURVE, SQLite) with one published pack; the hostile peer is an allow-listed station.
Both run as threads in this process.

Each surface gets `--n` messages drawn (seeded) from ~30 kinds: random bytes, valid messages
with flipped / cut / inserted bytes, deep nesting, huge ints, 1e400, NaN, lone surrogates,
missing or mistyped header fields, msg_ids that are not uuid4 hex, unknown or wrong-link
types, bad buffer descriptors, frames whose sum is over the limit, a frame over the limit
(the peer is disconnected by design: no reply expected), REQ delimiters; for the hub also
identity spoofing, reports with long reasons and made-up names, fetches at odd offsets and
credits, long installed lists. After every message the bench waits for the reply (2 s);
every 250 messages a valid request must be answered (liveness).

Columns: hostile inputs sent; crashes/hangs (serving thread dead, a liveness probe or an
expected reply that never came); `internal` replies; RSS growth of this process from after
a 200-message warm-up (hostile too, counted in the inputs) to the end (gc'd; server and client
both in it). Prints a Markdown table
and writes reports/bench/fuzz.json. bench/fuzz_packs.py adds the hostile-pack rows.
"""

from __future__ import annotations

import argparse
import collections
import gc
import io
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, write_report

from kaizen.runtime.protocol import PROTOCOL_VERSION, Message

REPLY_WAIT_MS = 2000
PROBE_EVERY = 250


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _header(msg_type, **patch) -> dict:
    h = {"protocol_version": PROTOCOL_VERSION, "msg_type": msg_type, "msg_id": uuid.uuid4().hex,
         "reply_to": None, "sent_at": time.time(), "buffers": []}
    h.update(patch)
    return h


def _raw(header: dict, body, *buffers) -> list[bytes]:
    b = body if isinstance(body, bytes) else json.dumps(body).encode()
    return [json.dumps(header).encode(), b, *buffers]


class Hostile:
    """Seeded generator of (kind, frames, expects_reply) for one surface ("endpoint" / "hub")."""

    def __init__(self, rng: random.Random, surface: str, limit: int, valid: list):
        self.rng, self.surface, self.limit, self.valid = rng, surface, limit, valid

    def kinds(self):
        common = [self.random_bytes, self.mutated, self.deep, self.huge_int, self.inf_float, self.nan,
                  self.surrogate, self.missing_field, self.bad_field_type, self.bad_msg_id, self.unknown_type,
                  self.wrong_link, self.bad_buffers, self.total_too_large, self.req_delimiter,
                  self.extra_frames, self.wrong_body_types, self.big_header, self.negative_ints]
        if self.surface == "hub":
            common += [self.spoofed_hello, self.long_reason, self.junk_report, self.odd_fetch, self.long_installed]
        else:
            common += [self.bad_images, self.long_instruction, self.odd_task]
        return common

    def draw(self):
        if self.rng.random() < 0.01:
            return self.frame_over_limit()
        return self.rng.choice(self.kinds())()

    def _valid(self):
        return [bytes(f) for f in self.rng.choice(self.valid)()]

    # -- generic
    def random_bytes(self):
        return "random_bytes", [self.rng.randbytes(self.rng.randrange(0, 200)) for _ in range(self.rng.randrange(1, 5))], True

    def mutated(self):
        frames = self._valid()
        i = self.rng.randrange(len(frames))
        f = bytearray(frames[i])
        for _ in range(self.rng.randrange(1, 6)):
            op, pos = self.rng.choice("fci"), self.rng.randrange(max(1, len(f)))
            if op == "f" and f:
                f[pos] ^= self.rng.randrange(1, 256)
            elif op == "c":
                del f[pos:]
            else:
                f[pos:pos] = self.rng.randbytes(self.rng.randrange(1, 9))
        frames[i] = bytes(f)
        return "mutated", frames, True

    def deep(self):
        depth = self.rng.choice([100, 1000, 30000])
        if self.rng.random() < 0.5:
            return "deep_nesting", [b"[" * depth, b"{}"], True
        return "deep_nesting", _raw(_header("status_request" if self.surface == "endpoint" else "report"),
                                    b'{"x":' + b"[" * depth + b"]" * depth + b"}"), True

    def huge_int(self):
        h = _header(self._type())
        raw = json.dumps(h).replace('"sent_at": ', '"sent_at": 1' + "0" * 400 + ', "_": ').encode()
        return "huge_int", [raw, json.dumps(self._body()).encode()], True

    def inf_float(self):
        return "1e400", _raw(_header(self._type()), json.dumps(self._body())[:-1].encode() + b', "x": 1e400}'), True

    def nan(self):
        return "NaN", _raw(_header(self._type()), json.dumps(self._body())[:-1].encode() + b', "x": NaN}'), True

    def surrogate(self):
        body = json.dumps(self._body())[:-1].encode() + b', "s": "\\ud800"}'
        return "lone_surrogate", _raw(_header(self._type()), body, *self._buffers()), True

    def missing_field(self):
        h = _header(self._type())
        del h[self.rng.choice(list(h))]
        return "missing_header_field", _raw(h, self._body(), *self._buffers()), True

    def bad_field_type(self):
        h = _header(self._type())
        h[self.rng.choice(list(h))] = self.rng.choice([None, True, 3.5, "x", [], {}, -1, 2 ** 70])
        return "bad_header_type", _raw(h, self._body(), *self._buffers()), True

    def bad_msg_id(self):
        return "bad_msg_id", _raw(_header(self._type(), msg_id=self.rng.choice(["", "abc", "Z" * 32, "a" * 5000])),
                                  self._body(), *self._buffers()), True

    def unknown_type(self):
        return "unknown_type", _raw(_header(self.rng.choice(["frob", "", "x" * 300])), {}), True

    def wrong_link(self):
        other = "hello" if self.surface == "endpoint" else "infer_request"
        return "wrong_link", _raw(_header(self.rng.choice([other, "install_request", "rollback_request", "ack"])),
                                  {"task_id": "t", "path": "/etc/passwd"}), True

    def bad_buffers(self):
        desc = self.rng.choice([[{"name": "image", "dtype": "u1", "shape": [10 ** 6, 10 ** 6, 3], "nbytes": 4}],
                                [{"name": "image", "dtype": "O", "shape": [1], "nbytes": 1}],
                                [{"name": "image", "dtype": "u1", "shape": [1] * 100, "nbytes": 1}],
                                [{"name": "image", "kind": "bytes", "nbytes": 99}],
                                [{"name": "a", "kind": "bytes", "nbytes": 1}, {"name": "a", "kind": "bytes", "nbytes": 1}],
                                "notalist"])
        return "bad_buffers", _raw(_header(self._type(), buffers=desc), self._body(), b"x", b"y"), True

    def total_too_large(self):
        part = self.limit // 2 + 1024
        return "sum_over_limit", _raw(_header(self._type()), self._body(), b"a" * part, b"b" * part), True

    def frame_over_limit(self):
        return "frame_over_limit", [json.dumps(_header(self._type())).encode(), b"{}", b"x" * (self.limit + 4096)], False

    def req_delimiter(self):
        return "req_delimiter", [b"", *self._valid()], True

    def extra_frames(self):
        return "extra_frames", self._valid() + [b"x"] * self.rng.randrange(1, 50), True

    def wrong_body_types(self):
        body = {k: self.rng.choice([None, True, -5, 2 ** 64, "x", [], {}, [{}], 1.5]) for k in self._body()}
        return "wrong_body_types", _raw(_header(self._type()), body, *self._buffers()), True

    def big_header(self):
        return "big_header", _raw(_header(self._type(), pad="p" * 70_000), self._body()), True

    def negative_ints(self):
        body = {k: (-1 if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in self._body().items()}
        return "negative_ints", _raw(_header(self._type()), body, *self._buffers()), True

    # -- endpoint
    def bad_images(self):
        img = self.rng.choice([b"", b"GIF89a", self.rng.randbytes(100), _png(1, 1), _png_header(30000, 30000),
                               b"\xff\xd8\xff" + self.rng.randbytes(50)])
        fmt = self.rng.choice(["encoded", "array"])
        return "bad_image", _raw(_header("infer_request", buffers=[{"name": "image", "kind": "bytes", "nbytes": len(img)}]),
                                 {"instruction": "q", "image_format": fmt}, img), True

    def long_instruction(self):
        text = self.rng.choice(["\U0001f600" * 2000, "a" * 200_000, "\x00" * 100, " \n\t"])
        return "long_instruction", _raw(_header("infer_request", buffers=[{"name": "image", "kind": "bytes", "nbytes": len(PNG)}]),
                                        {"instruction": text, "image_format": "encoded"}, PNG), True

    def odd_task(self):
        task = self.rng.choice([None, "", "nope", "x" * 10000, 5, ["a"], {"a": 1}])
        return "odd_task", _raw(_header("infer_request", buffers=[{"name": "image", "kind": "bytes", "nbytes": len(PNG)}]),
                                {"instruction": "q", "image_format": "encoded", "task": task}, PNG), True

    # -- hub
    def spoofed_hello(self):
        return "spoofed_hello", _raw(_header("hello"), {"station_id": self.rng.choice(["line2/s01", "x", "a" * 5000]),
                                                        "base_fingerprint": "f", "runtime_version": "1", "installed": []}), True

    def long_reason(self):
        return "long_reason", _raw(_header("report"), {"name": "pick-1.kpk", "task_id": "pick", "version": 1,
                                                       "state": "rejected", "reason": "r" * self.rng.choice([10, 5000, 600_000])}), True

    def junk_report(self):
        return "junk_report", _raw(_header("report"), {"name": uuid.uuid4().hex + ".kpk", "task_id": "t" * 100,
                                                       "version": self.rng.randrange(2 ** 63), "state": "activated",
                                                       "reason": None}), True

    def odd_fetch(self):
        name, sha = self.pack
        credit = self.rng.choice([1, 1024, 2 ** 62])
        offset = self.rng.choice([0, 5, 10 ** 9, 2 ** 63 - 1])
        body = {"name": self.rng.choice([name, "../../etc/passwd", ""]), "sha256": self.rng.choice([sha, "0" * 64]),
                "offset": offset, "credit": credit}
        return "odd_fetch", _raw(_header("fetch"), body), True

    def long_installed(self):
        items = [{"task_id": f"t{i}", "version": i, "extra": "x" * 10} for i in range(self.rng.choice([10, 5000]))]
        return "long_installed", _raw(_header("heartbeat"), {"station_id": "line1/s00", "installed": items,
                                                             "serving": True}), True

    # -- helpers
    def _type(self):
        return self.rng.choice(["infer_request", "status_request"] if self.surface == "endpoint"
                               else ["hello", "heartbeat", "fetch", "report"])

    def _body(self):
        if self.surface == "endpoint":
            return {"instruction": "is it torn?", "image_format": "encoded"}
        return {"name": "pick-1.kpk", "task_id": "pick", "version": 1, "state": "received", "reason": None}

    def _buffers(self):
        return (PNG,) if self.surface == "endpoint" else ()


def _png(w, h) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(w, h) -> bytes:
    """A PNG that claims w x h pixels (a decompression bomb's header), with a tiny body."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


PNG = b""


class StationLikeBackend:
    """Tokenizes (UTF-8) and decodes images with PIL (its default pixel limit), like a Station."""

    def infer(self, image, instruction, task=None):
        from PIL import Image

        from kaizen.runtime.errors import InputError

        if not instruction.strip():
            raise InputError("instruction is empty")
        instruction.encode("utf-8")
        if task is not None and task != "holes":
            raise InputError(f"task {task[:40]!r} is not installed here")
        if isinstance(image, bytes):
            try:
                with Image.open(io.BytesIO(image)) as im:
                    im.load()
            except (OSError, SyntaxError) as err:
                raise InputError(f"not an image: {err}") from None
        return {"outcome": "answered", "answer": "yes", "task_id": "holes", "pack_version": 1, "selected": ["holes"],
                "scores": {"holes": 0.9}, "confidence": 0.9}

    def status(self):
        return {"packs": []}


class Driver:
    """Sends frames from a DEALER and collects the reply to each (counts codes, misses, internal)."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.codes: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()
        self.missing = 0

    def send(self, frames, expects_reply: bool, kind: str) -> bool:
        self.kinds[kind] += 1
        try:
            msg_id = json.loads(frames[0 if frames[0] else 1]).get("msg_id")
        except (ValueError, RecursionError, AttributeError, IndexError, UnicodeDecodeError):
            msg_id = None
        self.sock.send_multipart(frames)
        if not expects_reply:
            return True
        end = time.monotonic() + REPLY_WAIT_MS / 1000
        while (left := end - time.monotonic()) > 0 and self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
            raw = self.sock.recv_multipart()
            if raw and raw[0] == b"":
                raw = raw[1:]
            header, body = json.loads(raw[0]), json.loads(raw[1])
            if header.get("reply_to") in (msg_id, None) or msg_id is None:
                self.codes[body.get("error", body.get("status", "?")) if header["msg_type"] == "error"
                           else header["msg_type"]] += 1
                return True
        self.missing += 1
        return False


def run_surface(name: str, n: int, seed: int, make_socket, valid, limit: int, probe, alive, extra_setup=None) -> dict:
    rng = random.Random(seed)
    gen = Hostile(rng, name.split()[0], limit, valid)
    if extra_setup:
        extra_setup(gen)
    sock = make_socket()
    drv = Driver(sock)
    probes_failed = 0
    t0 = time.time()
    rss0 = None
    for i in range(n + 200):
        if i == 200:
            gc.collect()
            rss0 = rss_mb()
        kind, frames, expects = gen.draw()
        drv.send(frames, expects, kind)
        if not expects:   # disconnected by design: a fresh socket
            sock.close(0)
            sock = drv.sock = make_socket()
        if i % PROBE_EVERY == 0 and not probe(drv):
            probes_failed += 1
    gc.collect()
    rss1 = rss_mb()
    sock.close(0)
    internal = drv.codes.get("internal", 0)
    kinds = {k: v for k, v in drv.kinds.items() if v > 0}
    return {"surface": name, "hostile_inputs": sum(kinds.values()), "after_warmup": n, "kinds": len(kinds), "crashes": int(not alive()),
            "hangs": drv.missing + probes_failed, "internal_replies": internal, "rss_growth_mb": round(rss1 - rss0, 1),
            "rss_mb_end": round(rss1, 1), "seconds": round(time.time() - t0, 1), "replies_by_code": dict(drv.codes),
            "sent_by_kind": kinds}


def fuzz_endpoint(n: int, seed: int, folder: Path) -> dict:
    from kaizen.runtime.endpoint import InferenceServer

    limit = 1 << 20
    ctx = zmq.Context.instance()
    server = InferenceServer(StationLikeBackend(), f"ipc://{folder}/fuzz.ipc", max_bytes=limit, poll_ms=10).start()

    def make_socket():
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(server.endpoint)
        return s

    valid = [lambda: Message("infer_request", {"instruction": "is it torn?", "image_format": "encoded"},
                             {"image": PNG}).encode(),
             lambda: Message("status_request", {}).encode()]

    def probe(drv):
        before = drv.codes["status_reply"]
        drv.send(Message("status_request", {}).encode(), True, "probe")
        drv.kinds["probe"] -= 1
        return drv.codes["status_reply"] > before

    try:
        row = run_surface("endpoint", n, seed, make_socket, valid, limit, probe,
                          lambda: server._thread is not None and server._thread.is_alive())
        row["endpoint_stats"] = server.stats.snapshot()
    finally:
        server.stop()
    return row


def fuzz_hub(n: int, seed: int, folder: Path) -> dict:
    from kaizen.hub.fleet_sim import Fleet, make_test_packs
    from kaizen.runtime.keys import TrustedKeys, generate_signing_key, load_curve_keypair, load_curve_public

    key = generate_signing_key()
    fleet = Fleet(folder / "fleet", 2, TrustedKeys([key.public_key()]), "fp", chunk_size=32 * 1024,
                  groups={"line1/s00": ["line1"], "line2/s01": ["line2"]})
    pack = make_test_packs(folder / "packs", key, [("pick", 1)], base_fingerprint="fp", layers=2)[0]
    fleet.publish(pack, "@line1")
    hub = fleet.start_hub()
    ctx = zmq.Context.instance()
    public, secret = load_curve_keypair(fleet.root / "keys" / "station0.key")

    def make_socket():
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.curve_secretkey, s.curve_publickey = secret, public
        s.curve_serverkey = load_curve_public(fleet.hub_config.public_key_file)
        s.connect(fleet.hub_config.bind)
        return s

    def hello():
        return Message("hello", {"station_id": "line1/s00", "base_fingerprint": "fp", "runtime_version": "1",
                                 "installed": []}).encode()

    from kaizen.runtime.durable import sha256_file

    sha = sha256_file(pack)
    valid = [hello, lambda: Message("fetch", {"name": pack.name, "sha256": sha, "offset": 0, "credit": 1024}).encode(),
             lambda: Message("report", {"name": pack.name, "task_id": "pick", "version": 1, "state": "received",
                                        "reason": None}).encode()]

    def probe(drv):
        before = drv.codes["desired_state"]
        drv.send(hello(), True, "probe")
        drv.kinds["probe"] -= 1
        return drv.codes["desired_state"] > before

    def setup(gen):
        gen.pack = (pack.name, sha)

    try:
        limit = getattr(fleet.hub_config, "max_message_bytes", 1 << 20)   # getattr: also runs on older hubs
        row = run_surface("hub (allow-listed peer)", n, seed, make_socket, valid, limit,
                          probe, lambda: hub._thread is not None and hub._thread.is_alive(), setup)
        row["hub_stats"] = {k: (dict(v) if isinstance(v, dict) else v) for k in
                            ("internal", "dropped", "errors", "reports_ignored", "fetch_count")
                            if (v := getattr(hub.stats, k, None)) is not None}
        from kaizen.hub.db import HubDB

        db = HubDB(fleet.hub_config.db_path)
        try:
            row["db_deliveries_rows"] = len(db.deliveries())
        finally:
            db.close()
        row["db_bytes"] = sum(p.stat().st_size for p in fleet.hub_config.db_path.parent.glob("hub.sqlite*"))
    finally:
        fleet.close()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| surface | hostile inputs | crashes / hangs | `internal` replies | RSS growth after |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['surface']} | {r['hostile_inputs']:,} ({r['kinds']} kinds) | {r['crashes']} / {r['hangs']} | "
                     f"{r['internal_replies']} | {r['rss_growth_mb']:+.1f} MB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    global PNG
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="hostile messages per surface")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["endpoint", "hub"], help="run one surface")
    a = ap.parse_args(argv)
    PNG = _png(8, 8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kzfuzz") as tmp:
        if a.only in (None, "endpoint"):
            rows.append(fuzz_endpoint(a.n, a.seed, Path(tmp)))
        if a.only in (None, "hub"):
            rows.append(fuzz_hub(a.n, a.seed, Path(tmp)))
    print(table(rows))
    path = write_report("fuzz", {"rows": rows, "machine": load(), "n": a.n, "seed": a.seed})
    print(f"wrote {path}")
    return 0 if all(r["crashes"] == 0 and r["hangs"] == 0 and r["internal_replies"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
