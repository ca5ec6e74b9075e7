"""Upload of captured parts to the hub over the fleet link (the station side of the improvement loop).

    up = Uploader(capture_queue, chunk_bytes=256 * 1024, window=8, resend_s=2.0)
    up.pump(time.monotonic(), send)      # each turn of the daemon's loop; send(Message) puts it on the DEALER
    up.on_ack(body, reply_to)            # a sample_ack from the hub
    up.on_error(code, reply_to)          # an `error` reply; True when it answered one of our sample_chunks
    up.reset()                           # the link was reopened: resend in-flight samples from the hub's offset

The queue is runtime/capture.py's CaptureQueue (pending / load / uploaded / refused). At most
`window` samples are in flight, one `sample_chunk` each (data <= chunk_bytes, meta on every
chunk), so the bytes in flight are bounded by window x chunk_bytes and the memory by window
samples' images. A chunk not acked within `resend_s` is sent again (its timeout doubling up to
RESEND_MAX_S); the hub's `sample_ack.offset` is authoritative, so a hub that already holds more
(a restart of either side) moves the station forward, one that holds less moves it back.

A sample leaves the queue only when the hub says `done`: stored (queue.uploaded) or refused for
good (queue.refused(reason): moved aside at the station, kept). A hub that answers
`unknown_type` / `unsupported_type` (an older hub) or a `retry_s` ack (its sample store is full)
pauses all uploads with backoff; nothing is dropped. No torch here.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from .protocol import Message

log = logging.getLogger("kaizen.uploader")

OLD_HUB_CODES = frozenset({"unknown_type", "unsupported_type"})
RESEND_MAX_S = 60.0
PAUSE_FIRST_S, PAUSE_MAX_S = 30.0, 3600.0     # hub without samples support: back off, doubling
SAMPLE_RETRY_FIRST_S, SAMPLE_RETRY_MAX_S = 5.0, 600.0   # one sample the hub errored on
MIN_CHUNK_BYTES = 4096
HELD_BACK_KEPT = 1024   # samples waiting for a retry time (bounded; the oldest forgets its delay)
MSG_IDS_KEPT = 4096     # sample_chunk msg_id -> sample_id, for acks and errors


@dataclass
class _Slot:
    """One sample in flight: its meta and image, the hub's offset, the chunk out now."""

    sample_id: str
    meta: dict
    data: bytes
    offset: int = 0                 # bytes the hub holds (as far as we know)
    msg_id: str | None = None       # the chunk in flight (None: send at the next pump)
    sent_at: float = 0.0
    timeout: float = 0.0


@dataclass
class UploadStats:
    chunks_sent: int = 0
    bytes_sent: int = 0
    resends: int = 0
    uploaded: int = 0
    refused: int = 0
    hub_full: int = 0              # acks with retry_s (the hub's sample store is full)
    old_hub: int = 0               # unknown_type / unsupported_type answers
    errors: int = 0                # other error replies to a sample_chunk
    resumed: int = 0               # acks that moved a sample to another offset than sent
    load_errors: int = 0
    refusals: dict = field(default_factory=dict)   # sample_id -> reason (latest 100)


class Uploader:
    """Sends a CaptureQueue's pending samples to the hub; one instance per daemon, one thread."""

    def __init__(self, queue, *, chunk_bytes: int = 256 * 1024, window: int = 8, resend_s: float = 2.0,
                 pause_first_s: float = PAUSE_FIRST_S, pause_max_s: float = PAUSE_MAX_S):
        if chunk_bytes < MIN_CHUNK_BYTES or window < 1 or not resend_s > 0:
            raise ValueError(f"Uploader needs chunk_bytes >= {MIN_CHUNK_BYTES}, window >= 1 and resend_s > 0, "
                             f"got {chunk_bytes}, {window}, {resend_s}")
        self.queue = queue
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.resend_s = resend_s
        self.pause_first_s, self.pause_max_s = pause_first_s, pause_max_s
        self.stats = UploadStats()
        self.paused_until = 0.0
        self._pause_s = 0.0
        self._slots: dict[str, _Slot] = {}
        self._msg_ids: OrderedDict[str, str] = OrderedDict()
        self._held: OrderedDict[str, tuple[float, int]] = OrderedDict()   # sample_id -> (retry at, failures)
        self._now = 0.0

    # ------------------------------------------------------------ state

    @property
    def in_flight(self) -> list[str]:
        return list(self._slots)

    def owns(self, reply_to: str | None) -> bool:
        """True when `reply_to` is the msg_id of a sample_chunk this uploader sent (recently)."""
        return reply_to is not None and reply_to in self._msg_ids

    def reset(self) -> None:
        """The DEALER was reopened: what was in flight is lost; resend from the hub's offset now."""
        for slot in self._slots.values():
            slot.msg_id = None

    # ------------------------------------------------------------ sending

    def pump(self, now: float, send) -> None:
        """Fill the window from the queue, resend overdue chunks, send what is due."""
        self._now = now
        if now < self.paused_until:
            return
        self._fill(now)
        for slot in list(self._slots.values()):
            if slot.msg_id is None:
                self._send_chunk(slot, now, send)
            elif now - slot.sent_at >= slot.timeout:
                self.stats.resends += 1
                slot.timeout = min(slot.timeout * 2, RESEND_MAX_S)
                self._send_chunk(slot, now, send, keep_timeout=True)

    def _fill(self, now: float) -> None:
        free = self.window - len(self._slots)
        if free <= 0:
            return
        want = min(free + len(self._slots) + len(self._held), 4 * HELD_BACK_KEPT)
        for sample_id in self.queue.pending(limit=want):
            if len(self._slots) >= self.window:
                return
            if sample_id in self._slots:
                continue
            held = self._held.get(sample_id)
            if held is not None and held[0] > now:
                continue
            try:
                meta, data = self.queue.load(sample_id)
            except KeyError:
                continue   # uploaded or dropped by the queue's cap meanwhile
            except (OSError, ValueError) as err:   # a damaged entry: the queue moves it aside on its next load
                self.stats.load_errors += 1
                log.warning("capture %s not readable for upload: %s", sample_id, err)
                continue
            self._slots[sample_id] = _Slot(sample_id, meta, bytes(data))

    def _send_chunk(self, slot: _Slot, now: float, send, *, keep_timeout: bool = False) -> None:
        total = len(slot.data)
        start = min(slot.offset, total)
        data = slot.data[start:start + self.chunk_bytes]
        msg = Message("sample_chunk", {"sample_id": slot.sample_id, "offset": start, "total_size": total,
                                       "meta": slot.meta}, {"data": data})
        if slot.msg_id is not None:
            self._msg_ids.pop(slot.msg_id, None)
        slot.msg_id, slot.sent_at = msg.msg_id, now
        if not keep_timeout:
            slot.timeout = self.resend_s
        self._msg_ids[msg.msg_id] = slot.sample_id
        while len(self._msg_ids) > MSG_IDS_KEPT:
            self._msg_ids.popitem(last=False)
        send(msg)
        self.stats.chunks_sent += 1
        self.stats.bytes_sent += len(data)

    # ------------------------------------------------------------ answers

    def on_ack(self, body: dict, reply_to: str | None = None) -> None:
        """A sample_ack: done (stored or refused for good), the hub is full, or the offset it holds."""
        sample_id = body.get("sample_id")
        slot = self._slots.get(sample_id) if isinstance(sample_id, str) else None
        if slot is None:
            return   # a late ack of a sample already finished (or never ours)
        current = reply_to is not None and reply_to == slot.msg_id
        if body.get("done") is True:
            refused = body.get("refused")
            self._finish(slot, refused if isinstance(refused, str) and refused else None)
            return
        retry = body.get("retry_s")
        if isinstance(retry, (int, float)) and not isinstance(retry, bool) and math.isfinite(retry):
            if self._now < self.paused_until:
                return
            self.stats.hub_full += 1
            self._pause(max(float(retry), 1.0), "the hub's sample store is full")
            return
        offset = body.get("offset")
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= len(slot.data):
            return
        if offset > slot.offset or current:
            if offset != slot.offset + self._chunk_len(slot):
                self.stats.resumed += 1
            slot.offset = offset
            slot.msg_id = None   # send the next chunk (or the one the hub asks for) at the next pump
            self._held.pop(slot.sample_id, None)

    def _chunk_len(self, slot: _Slot) -> int:
        return min(self.chunk_bytes, max(len(slot.data) - slot.offset, 0))

    def on_error(self, code: str, reply_to: str | None) -> bool:
        """An error reply; returns True when it answered one of our sample_chunks (handled here)."""
        sample_id = self._msg_ids.pop(reply_to, None) if reply_to is not None else None
        if sample_id is None:
            return False
        if code in OLD_HUB_CODES:
            if self._now < self.paused_until:
                return True   # the other chunks of the same window: paused already
            self.stats.old_hub += 1
            self._pause(None, f"the hub does not take samples ({code})")
            return True
        self.stats.errors += 1
        slot = self._slots.pop(sample_id, None)
        if code == "too_large" and self.chunk_bytes > MIN_CHUNK_BYTES:
            self.chunk_bytes = max(self.chunk_bytes // 2, MIN_CHUNK_BYTES)
            log.warning("hub refused a sample_chunk as too large: chunks of %d bytes from now on", self.chunk_bytes)
            if slot is not None:
                slot.msg_id = None
                self._slots[sample_id] = slot
            return True
        _, fails = self._held.pop(sample_id, (0.0, 0))
        delay = min(SAMPLE_RETRY_FIRST_S * 2 ** fails, SAMPLE_RETRY_MAX_S)
        self._held[sample_id] = (self._now + delay, fails + 1)
        while len(self._held) > HELD_BACK_KEPT:
            self._held.popitem(last=False)
        log.warning("hub error %s on sample %s: kept, retried in %.0f s", code, sample_id[:12], delay)
        return True

    def _pause(self, seconds: float | None, why: str) -> None:
        if seconds is None:
            self._pause_s = min(max(self._pause_s * 2, self.pause_first_s), self.pause_max_s)
            seconds = self._pause_s
        self.paused_until = self._now + seconds
        self.reset()
        self._slots.clear()   # images leave memory; the queue keeps every sample
        log.warning("sample upload paused for %.0f s: %s; captured samples stay queued", seconds, why)

    def _finish(self, slot: _Slot, refused: str | None) -> None:
        del self._slots[slot.sample_id]
        if slot.msg_id is not None:
            self._msg_ids.pop(slot.msg_id, None)
        self._held.pop(slot.sample_id, None)
        self._pause_s = 0.0
        if refused is None:
            self.queue.uploaded(slot.sample_id)
            self.stats.uploaded += 1
            return
        self.queue.refused(slot.sample_id, refused)
        self.stats.refused += 1
        self.stats.refusals[slot.sample_id] = refused
        while len(self.stats.refusals) > 100:
            self.stats.refusals.pop(next(iter(self.stats.refusals)))
        log.warning("hub refused sample %s for good: %s (kept in the queue's refused folder)",
                    slot.sample_id[:12], refused)
