"""The Station: a frozen ONNX base + a store of task packs, answering image + instruction.

    st = Station("bundles/tiny-llama", "station/store", TrustedKeys.from_dir("keys/trusted"))
    st.install("seal_defect-3.kpk")          # verify, warm up, golden probe, atomic switch
    st.infer(png_bytes, "Is the seal torn?")  # -> dict(answer, task_id, pack_version, scores, ...)

Selection is ModalPrompt's: CLIP image + instruction embeddings scored against every installed
pack's key (runtime/selection.py); the top-k packs' prompts (each shifted by the part's image
query when its pack carries a prompt net: runtime/prompt_net.py) are concatenated best first, the
top-1 pack's LoRA (made once per pack on the decoder's device: runtime/lora_device.py) and closed
answer set are used. Below `threshold` the station answers "no task matches" instead of
guessing. Requests read one immutable snapshot of the installed set, so an install or rollback
never changes a request in flight.

Every result carries a `part_id`; the last parts are kept (runtime/capture_policy.py) so that
`st.feedback("torn", part_id=...)` records an operator's correction without resending the image.
With `capture=CaptureQueue(...)` (runtime/capture.py) no-match parts and answers below the task's
capture confidence are queued for the hub, off the inference path.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import RUNTIME_VERSION
from .bundle import Bundle
from .capture_image import encoded_image, sample_id_of
from .capture_policy import CapturePolicy, RecentParts, check_feedback, kept_image
from .durable import atomic_write_bytes
from .engine import Engine
from .errors import InputError, PackError
from .keys import TrustedKeys
from .lora_device import LoraCache
from .preprocess import MAX_PIXELS, load_rgb
from .prompt_net import conditioned
from .prompting import MAX_INSTRUCTION_TOKENS, check_instruction, check_instruction_tokens
from .selection import ALPHA, normalise, scores, top_k
from .store import PackStore


@dataclass(frozen=True)
class _Snapshot:
    """The installed set as one immutable value (swapped by reference)."""

    packs: tuple  # LoadedPack, sorted by task id
    keys: np.ndarray  # [T, d_img + d_txt]: each pack's image key then its text key
    known_text: dict = field(default_factory=dict)  # instruction -> text query embedding from packs
    lora: tuple = ()  # DeviceLora per pack (runtime/lora_device.py): made once per pack, fed as is
    fusion: tuple = ()  # per pack: packs fused when it is the best match (pack_fusion_k)


DEFAULT_TOP_K = 3   # packs fused for a pack that does not say (written before fusion_top_k existed)


def fused_prompt(packs, q_img: np.ndarray) -> np.ndarray:
    """The selected packs' prompts concatenated best first: [R, d] for every part, or [B, R, d] (one
    per part, q_img [B, d_img]) when a pack conditions its prompt on the image."""
    if all(p.prompt_net is None for p in packs):
        return np.concatenate([p.prompt for p in packs], axis=0)
    return np.concatenate([conditioned(p.prompt, p.prompt_net, q_img) for p in packs], axis=1)


def pack_fusion_k(pack) -> int:
    """Packs the trainer fused when `pack` was the best match: manifest metrics `fusion_top_k`
    (an int 1..64), else DEFAULT_TOP_K."""
    own = pack.manifest.metrics.get("fusion_top_k")
    return own if isinstance(own, int) and not isinstance(own, bool) and 1 <= own <= 64 else DEFAULT_TOP_K


def key_for_bundle(key: np.ndarray, query_dims: list[int], bundle_dims: tuple[int, int], aligned: bool) -> np.ndarray:
    """A pack's key as [key_img ; key_txt] for a bundle with query widths `bundle_dims`, or
    PackError when it does not fit (trained for another base's query encoders)."""
    key = np.asarray(key, np.float32)
    d_img, d_txt = bundle_dims
    if query_dims:  # schema 2: one key per modality
        if tuple(query_dims) != (d_img, d_txt):
            raise PackError(f"bad array key.npy: the pack's keys are {query_dims} wide, this base's queries "
                            f"{[d_img, d_txt]}: it was trained for another base")
        return key
    if not aligned or key.shape[0] != d_img or d_img != d_txt:  # schema 1: one shared key
        raise PackError(f"bad array key.npy: a shared key of {key.shape[0]} values cannot score this base's "
                        f"queries {[d_img, d_txt]} (schema 1 packs need an aligned CLIP base)")
    return np.concatenate([key, key])


def _snapshot(active, bundle_dims: tuple[int, int], aligned: bool, lora_for=None) -> _Snapshot:
    packs = tuple(active[t] for t in sorted(active))
    keys = (np.stack([key_for_bundle(p.key, p.manifest.query_dims, bundle_dims, aligned) for p in packs])
            if packs else np.zeros((0, sum(bundle_dims)), np.float32))
    known = {}
    for p in packs:
        for instr, emb in zip(p.manifest.instructions, p.text_emb):
            known.setdefault(instr.strip(), np.asarray(emb, np.float32))
    return _Snapshot(packs, keys, known, lora_for(packs) if lora_for is not None else (),
                     tuple(pack_fusion_k(p) for p in packs))


class Station:
    def __init__(self, bundle_dir, store_root, trusted_keys: TrustedKeys, *, threshold: float = 0.3,
                 top_k: int = 0, alpha: float = ALPHA, providers: list[str] | None = None, threads: int = 0,
                 max_new_tokens: int = 16, probe_golden: bool = True, max_image_pixels: int = MAX_PIXELS,
                 max_instruction_tokens: int = MAX_INSTRUCTION_TOKENS, calibrated: bool = False,
                 capture=None, capture_confidence: float = 0.5, capture_task_confidence: dict | None = None,
                 recent_parts: int = 256):
        self.bundle = Bundle.open(bundle_dir, providers=providers, threads=threads)
        self.engine = Engine(self.bundle, max_instruction_tokens=max_instruction_tokens)
        self.max_image_pixels = max_image_pixels
        self.store = PackStore(store_root, trusted_keys, self.bundle.fingerprint, RUNTIME_VERSION)
        assert top_k >= 0, "top_k: 0 (each pack's own fusion_top_k) or the packs fused per answer"
        self.threshold, self.top_k, self.alpha = threshold, top_k, alpha   # top_k 0: from the packs
        self.calibrated = calibrated  # also refuse below the selected pack's own `selection_threshold`
        self.max_new_tokens, self.probe_golden = max_new_tokens, probe_golden
        self._lock = threading.Lock()
        self._rolled_back_file = Path(store_root) / "rolled_back.json"
        self._rolled_back = self._read_rolled_back()
        self.lora_cache = LoraCache(self.engine)   # each pack's LoRA on the decoder's device, once
        self._snap = self._snapshot()
        self.started_at = time.time()
        self.metrics = None   # a StationMetrics (runtime/station_metrics.py): installs, rollbacks, rejections
        self.capture = capture   # a CaptureQueue, or None: nothing is captured
        self.capture_policy = CapturePolicy(capture_confidence, dict(capture_task_confidence or {}))
        self.recent = RecentParts(recent_parts)

    # --- pack management -------------------------------------------------------------------------
    def install(self, kpk_path):
        with self._lock:
            probed: dict = {}   # (task, version) -> the golden probe's DeviceLora, which serving reuses
            try:
                manifest = self.store.install(kpk_path, probe=lambda contents: self._probe(contents, probed))
            except PackError as err:
                if self.metrics is not None:
                    self.metrics.pack_rejected(err)
                raise
            self._snap = self._snapshot(probed)
        if self.metrics is not None:
            self.metrics.pack_installed(manifest)
        return manifest

    def rollback(self, task_id: str):
        """Return a task to its previous pack; the rolled-back version is refused from then on."""
        with self._lock:
            active = self.store.active().get(task_id)
            manifest = self.store.rollback(task_id)
            if active is not None:
                self._rolled_back.setdefault(task_id, [])
                self._rolled_back[task_id] = sorted(set(self._rolled_back[task_id]) | {active.manifest.version})
                atomic_write_bytes(self._rolled_back_file, json.dumps(self._rolled_back, indent=1).encode())
            self._snap = self._snapshot()
        if self.metrics is not None:
            self.metrics.pack_rolled_back(task_id)
        return manifest

    def remove(self, task_id: str):
        """Stop serving a task (the hub unpublished it): it leaves the store and the selection."""
        with self._lock:
            manifest = self.store.remove(task_id)
            self._snap = self._snapshot()
        return manifest

    def reload_keys(self, trusted_keys: TrustedKeys) -> dict[str, list[str]]:
        """Apply a new trusted-key list now: packs signed by a removed key stop being served
        (status() says why), packs whose key is trusted again come back. Returns what moved."""
        with self._lock:
            moved = self.store.reload_keys(trusted_keys)
            self._snap = self._snapshot()
        return moved

    def _read_rolled_back(self) -> dict[str, list[int]]:
        try:
            data = json.loads(self._rolled_back_file.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as err:
            raise PackError(f"{self._rolled_back_file} is not valid JSON ({err}); fix it or delete it "
                            "(it lists pack versions rolled back on this station)") from err
        return {str(k): [int(v) for v in vs] for k, vs in data.items()}

    def _snapshot(self, probed: dict | None = None) -> _Snapshot:
        return _snapshot(self.store.active(), self.engine.query_dims, self.engine.aligned,
                         lambda packs: self.lora_cache.for_packs(packs, probed))

    @property
    def base_fingerprint(self) -> str:
        return self.bundle.fingerprint

    def installed(self) -> list[dict]:
        return [{"task_id": p.manifest.task_id, "version": p.manifest.version} for p in self._snap.packs]

    def _probe(self, contents, probed: dict | None = None) -> None:
        """Refuse rolled-back versions; warm up and check golden samples before a pack goes live."""
        m = contents.manifest
        key_for_bundle(contents.key, m.query_dims, self.engine.query_dims, self.engine.aligned)
        if m.version in self._rolled_back.get(m.task_id, []):
            raise PackError(f"{m.task_id} v{m.version} was rolled back on this station; publish a newer "
                            "version to move the task forward")
        lora = self.lora_cache.make(contents.lora)
        if probed is not None:
            probed[(m.task_id, m.version)] = lora
        samples = list(contents.golden)
        if not samples:
            warm = [np.zeros((self.engine.vision_pre.size,) * 2 + (3,), np.uint8)]
            self._answer_alone(contents, warm, [m.instructions[0]], lora)
            return
        got = self._answer_alone(contents, [s.image for s in samples], [s.instruction for s in samples], lora)
        wrong = [(s.answer, g[0]) for s, g in zip(samples, got) if g[0].strip().lower() != s.answer.strip().lower()]
        allowed = self.engine.bundle.golden_allowance(len(samples))
        if self.probe_golden and len(wrong) > allowed:
            raise PackError(f"golden probe failed for {contents.manifest.task_id} v{contents.manifest.version}: "
                            f"{len(wrong)} of {len(samples)} wrong (expected/got {wrong[:3]}; this "
                            f"{self.engine.bundle.meta.get('precision', 'fp32')} bundle allows {allowed}); "
                            "the pack does not work on this base, retrain or re-export it")

    def _answer_alone(self, contents, images, instructions, lora):
        """A pack's answers with its own prompt alone (warm-up, golden probe). An image-conditioned
        prompt needs the image queries: that vision pass also gives the image rows (unaligned
        bundles), so decoding does not run the vision tower again."""
        q_img, feats = self.engine.image_queries(images) if contents.prompt_net is not None else (None, None)
        return self._answer(images, instructions, fused_prompt([contents], q_img), lora, contents.answers, feats)

    # --- inference -------------------------------------------------------------------------------
    def _answer(self, images, instructions, prompt, lora, answers, feats=None):
        if answers:
            return [(s.answer, s.confidence) for s in
                    self.engine.score_answers(images, instructions, list(answers), prompt, lora, image_feats=feats)]
        return [(g.text, g.confidence) for g in
                self.engine.generate(images, instructions, prompt, lora, self.max_new_tokens, image_feats=feats)]

    def _text_queries(self, snap: _Snapshot, instructions: list[str]) -> np.ndarray:
        out = [None] * len(instructions)
        todo = [i for i, t in enumerate(instructions) if t not in snap.known_text]
        for i, t in enumerate(instructions):
            if t in snap.known_text:
                out[i] = snap.known_text[t]
        if todo:
            embs = self.engine.text_query([instructions[i] for i in todo])
            for i, e in zip(todo, embs):
                out[i] = e
        return normalise(np.stack(out))

    def _floor(self, pack) -> float:
        """The no-match threshold for a part whose best pack is `pack`: the station's `threshold`,
        raised to the pack's calibrated `selection_threshold` (manifest metrics) when `calibrated`."""
        own = pack.manifest.metrics.get("selection_threshold") if self.calibrated else None
        return max(self.threshold, float(own)) if isinstance(own, (int, float)) else self.threshold

    def _k(self, snap: _Snapshot, i: int) -> int:
        """Packs fused when pack i of `snap` is selected: the station's top_k when set, else the k
        that pack was trained with (derived once per snapshot), so stations fuse as the trainer did."""
        return self.top_k or snap.fusion[i]

    def infer(self, image, instruction: str, task: str | None = None) -> dict:
        return self.infer_batch([image], [instruction], [task])[0]

    def infer_batch(self, images, instructions, tasks=None) -> list[dict]:
        """Answer several parts; parts that select the same packs are decoded as one batch."""
        if self.capture is None:
            return self._infer_batch(images, instructions, tasks)
        with self.capture.inference():   # the capture queue's writer waits meanwhile
            return self._infer_batch(images, instructions, tasks)

    def _infer_batch(self, images, instructions, tasks) -> list[dict]:
        t0 = time.perf_counter()
        snap = self._snap
        n = len(images)
        tasks = list(tasks or [None] * n)
        if not (len(instructions) == n == len(tasks)) or n == 0:
            raise InputError(f"need as many instructions and tasks as images (got {n}, {len(instructions)}, {len(tasks)})")
        instructions = [check_instruction(t) for t in instructions]
        for t in instructions:  # bounded before any model runs: tokens, then pixels (before decoding)
            check_instruction_tokens(self.engine.tok, t, self.engine.max_instruction_tokens)
        rgb = [load_rgb(im, self.max_image_pixels) for im in images]
        if not snap.packs:
            return self._remember(images, rgb, instructions,
                                  [self._no_match({}, "no task packs are installed") for _ in range(n)])
        t1 = time.perf_counter()
        q_img, feats = self.engine.image_queries(rgb)
        s = scores(q_img, self._text_queries(snap, instructions), snap.keys, self.alpha)
        order = top_k(s, self.top_k or max(snap.fusion))
        t2 = time.perf_counter()
        names = [p.manifest.task_id for p in snap.packs]
        groups: dict[tuple, list[int]] = {}
        results: list[dict | None] = [None] * n
        for b in range(n):
            chosen = list(order[b])
            if tasks[b] is not None:
                if tasks[b] not in names:
                    raise InputError(f"task {tasks[b]!r} is not installed here (installed: {names})")
                forced = names.index(tasks[b])
                chosen = [forced] + [i for i in chosen if i != forced]
            elif s[b, chosen[0]] < (floor := self._floor(snap.packs[chosen[0]])):
                results[b] = self._no_match(self._scores(names, s[b]), f"best score {s[b, chosen[0]]:.3f} is below "
                                            f"the threshold {floor:.3f}")
                continue
            chosen = chosen[: self._k(snap, chosen[0])]
            groups.setdefault(tuple(chosen), []).append(b)
        for chosen, rows in groups.items():
            packs = [snap.packs[i] for i in chosen]
            prompt = fused_prompt(packs, q_img[rows])
            top = packs[0]
            got = self._answer([rgb[b] for b in rows], [instructions[b] for b in rows], prompt, snap.lora[chosen[0]],
                               top.answers, None if feats is None else feats[rows])
            for b, (answer, conf) in zip(rows, got):
                results[b] = {"outcome": "answered", "answer": answer, "task_id": top.manifest.task_id,
                              "pack_version": top.manifest.version, "selected": [p.manifest.task_id for p in packs],
                              "scores": self._scores(names, s[b]), "confidence": conf}
        t3 = time.perf_counter()
        timing = {"preprocess_ms": (t1 - t0) * 1e3, "select_ms": (t2 - t1) * 1e3, "decode_ms": (t3 - t2) * 1e3,
                  "total_ms": (t3 - t0) * 1e3, "batch": n}
        for r in results:
            r["timings_ms"] = timing
        return self._remember(images, rgb, instructions, results)

    def _remember(self, images, rgb, instructions, results: list[dict]) -> list[dict]:
        """Give each result a part_id, keep the part for feedback, queue the unsure ones for capture
        (the queue's writer thread encodes and writes them: nothing here waits for the disk)."""
        for image, pil, instruction, r in zip(images, rgb, instructions, results):
            r["part_id"] = uuid.uuid4().hex
            kept = kept_image(image, pil)
            self.recent.put(r["part_id"], kept, instruction, r)
            if self.capture is not None and (reason := self.capture_policy.reason(r)):
                self.capture.offer(kept, instruction, r, reason, identify=False)
        return results

    def feedback(self, answer: str, part_id: str | None = None, image=None, instruction: str | None = None,
                 task: str | None = None) -> dict:
        """An operator's (or PLC's) correct answer for a part, by the part_id of its result or by
        its image + instruction: captured with the answer as label. -> {"sample_id", "captured"}
        (captured is False when capture is off or the same sample is already queued)."""
        answer, task = check_feedback(answer, task)
        part = self.recent.get(part_id) if isinstance(part_id, str) else None
        if part is not None:
            image, instruction, result = part
        elif image is None:
            raise InputError(f"feedback part_id {part_id!r} is unknown or expired (the station keeps its last "
                             f"{self.recent.max_items} parts): send the image and instruction with the answer"
                             if part_id is not None else "feedback needs the part_id of an infer reply, or the "
                             "image and instruction of the part")
        else:
            instruction, result = check_instruction(instruction), None
            check_instruction_tokens(self.engine.tok, instruction, self.engine.max_instruction_tokens)
            image = kept_image(image, load_rgb(image, self.max_image_pixels))
        data, _ = encoded_image(image)
        sample_id = sample_id_of(data, instruction, answer)
        captured = self.capture is not None and not self.capture.has(sample_id)
        if captured:
            self.capture.offer(data, instruction, result, "feedback", label=answer, task_hint=task)
        return {"sample_id": sample_id, "captured": captured}

    SCORES_SHOWN = 8

    def _scores(self, names, row) -> dict[str, float]:
        """The best SCORES_SHOWN (at least top_k) selection scores, best first: O(k), not O(packs)."""
        keep = top_k(row[None, :], max(self.top_k, self.SCORES_SHOWN))[0]
        return {names[i]: round(float(row[i]), 6) for i in keep}

    @staticmethod
    def _no_match(scores: dict, why: str) -> dict:
        return {"outcome": "no_match", "answer": None, "task_id": None, "pack_version": None, "selected": [],
                "scores": scores, "confidence": 0.0, "detail": f"no task matches: {why}"}

    def status(self) -> dict:
        return {"runtime_version": RUNTIME_VERSION, "base_fingerprint": self.bundle.fingerprint,
                "providers": self.bundle.providers, "packs": self.store.list(),
                "inactive_packs": [{"task": t, "reason": r} for t, r in sorted(self.store.inactive().items())],
                "threshold": self.threshold,
                "top_k": self.top_k or "from the packs", "uptime_s": round(time.time() - self.started_at, 1),
                **({"capture": self.capture.stats()} if self.capture is not None else {})}

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
        self.store.close()
