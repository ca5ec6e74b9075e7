"""The torch-free inference engine: vision -> image tokens, soft prompts, LoRA inputs, greedy
generation with the KV cache, and constrained scoring over a closed answer set.

    eng = Engine(Bundle.open("bundles/tiny-llama"))
    [g] = eng.generate([image_bytes], ["Is the seal torn?"], prompt=P, lora=L)
    g.text, g.confidence
    [s] = eng.score_answers([image_bytes], ["Is the seal torn?"], ["yes", "no"], prompt=P, lora=L)

One prompt/LoRA set per call: a batch is one pack (the Station groups requests by pack). `prompt`
is [R, d] for every request, or [B, R, d], one per request (image-conditioned prompts,
runtime/prompt_net.py). `lora` is
a dict of numpy arrays (validated and padded per call) or a DeviceLora (runtime/lora_device.py:
made once per pack on the decoder's device, what the Station passes; no per-call copy on a GPU).

The decoder's lm_head runs only where logits are read: decoder.onnx's optional `logits_to_keep`
input is fed 1 for prefills and decode steps. Bundles exported before that input existed lack it;
the engine sees that once (`keeps_logits`) and feeds nothing (full logits, as before).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import Bundle
from .errors import InputError, PackError
from .lora_device import DeviceLora
from .preprocess import preprocess_batch
from .prompting import MAX_INSTRUCTION_TOKENS, answer_ids, clip_text_ids, prompt_ids

KEEP_INPUT = "logits_to_keep"  # decoder.onnx's optional int64 input: logits for the last N positions


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    confidence: float  # probability of the whole generated sequence (EOS included)


@dataclass
class Scored:
    answer: str
    confidence: float  # probability of `answer` among the closed set
    probs: dict[str, float]


def _softmax_log(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _prompt_row(prompt, b: int):
    """Request b's soft prompt: the shared [R, d] one, or row b of per-request prompts [B, R, d]."""
    return prompt[b] if prompt is not None and np.ndim(prompt) == 3 else prompt


def normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class Engine:
    def __init__(self, bundle: Bundle, *, max_instruction_tokens: int = MAX_INSTRUCTION_TOKENS):
        self.bundle = bundle
        self.max_instruction_tokens = max_instruction_tokens  # longer instructions: InputError
        self.spec = bundle.prompt_spec()
        self.tok = bundle.tokenizer()
        self.vision_pre = bundle.preprocess("vision")
        self.aligned = bundle.query["kind"] == "clip"
        if self.aligned:  # a CLIP query encoder: its own image and text towers
            self.clip_tok = bundle.tokenizer("clip_tokenizer.json")
            self.clip_pre = bundle.preprocess("clip")
            self.query_dims = (int(bundle.meta["clip"]["dim"]),) * 2
        else:  # unaligned: image query from the vision pass, text query from a sentence encoder
            from .text_query import TextQueryEncoder

            q = bundle.query
            self.text_encoder = TextQueryEncoder(bundle.path / "text_query.onnx", bundle.path / "text_tokenizer.json",
                                                 int(q["text_max_len"]), bundle.providers, bundle.threads)
            self.query_dims = (int(q["image_dim"]), int(q["text_dim"]))
        self.embed = bundle.embeddings()
        self.n_layers = bundle.meta["text"]["num_layers"]
        self.kv_heads = bundle.meta["text"]["num_kv_heads"]
        self.head_dim = bundle.meta["text"]["head_dim"]
        self.lora_shapes = bundle.lora_shapes()
        self.decoder = bundle.session("decoder.onnx")
        self.vision = bundle.session("vision.onnx")
        self.float = np.float16 if self.decoder.get_inputs()[0].type == "tensor(float16)" else np.float32
        # An input with a default is an overridable initializer (ORT's get_inputs() omits it);
        # bundles exported before logits_to_keep existed have neither.
        dec_inputs = self.decoder.get_inputs() + self.decoder.get_overridable_initializers()
        self.keeps_logits = KEEP_INPUT in {i.name for i in dec_inputs}

    # --- encoders ------------------------------------------------------------------------------
    def image_features(self, images) -> np.ndarray:
        return self.vision_pass(images)[0]

    def vision_pass(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """One vision.onnx run -> (image rows [B, N, d_model], unit image query [B, d_img] or None
        when the bundle's image query comes from a CLIP tower instead)."""
        px = preprocess_batch(images, self.vision_pre).astype(self.float)
        out = self.vision.run(None, {"pixel_values": px})
        query = None if self.aligned else normalise(out[1].astype(np.float32))
        return out[0], query

    def image_queries(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """Unit image queries [B, d_img], plus the image rows [B, N, d_model] when the query came from
        the base's own vision pass (reuse them for decoding: no second pass), else None."""
        if self.aligned:
            return self.clip_image(images), None
        feats, q_img = self.vision_pass(images)
        return q_img, feats

    def text_query(self, texts: list[str]) -> np.ndarray:
        """Unit text queries [n, d_txt] of instructions (CLIP text tower or sentence encoder)."""
        return self.clip_text(texts) if self.aligned else self.text_encoder.encode(texts)

    def clip_image(self, images) -> np.ndarray:
        px = preprocess_batch(images, self.clip_pre).astype(np.float32)
        sess = self.bundle.session("clip_image.onnx")
        return normalise(sess.run(None, {"pixel_values": px.astype(self._dtype_of(sess))})[0].astype(np.float32))

    def clip_text(self, texts: list[str]) -> np.ndarray:
        c = self.bundle.meta["clip"]
        ids, mask = clip_text_ids(self.clip_tok, texts, c["max_len"], c["bos_token_id"], c["eos_token_id"],
                                  c["pad_token_id"])
        out = self.bundle.session("clip_text.onnx").run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return normalise(out.astype(np.float32))

    @staticmethod
    def _dtype_of(sess) -> type:
        return np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32

    # --- inputs --------------------------------------------------------------------------------
    def lora_feeds(self, lora) -> dict:
        """Validate a pack's LoRA arrays against the bundle and zero-pad a smaller rank; a DeviceLora
        (runtime/lora_device.py: made once per pack, already on the decoder's device) is fed as is."""
        if isinstance(lora, DeviceLora):
            return lora.feeds  # type: ignore[return-value]
        if not lora:
            return {}
        feeds = {}
        for name, arr in lora.items():
            if name not in self.lora_shapes:
                raise PackError(f"LoRA input {name!r} does not exist in this base's decoder.onnx")
            want = self.lora_shapes[name]
            if arr.shape == want and arr.dtype == self.float:
                feeds[name] = arr  # already padded for this bundle (the Station pads once per pack)
                continue
            arr = np.asarray(arr, dtype=np.float32)
            is_a = name.endswith(".A")
            fixed_ok = arr.shape[1] == want[1] if is_a else arr.shape[0] == want[0]
            rank = arr.shape[0] if is_a else arr.shape[1]
            if arr.ndim != 2 or not fixed_ok or rank > want[0 if is_a else 1]:
                raise PackError(f"LoRA input {name!r} has shape {list(arr.shape)}; the base expects {list(want)}")
            padded = np.zeros(want, dtype=self.float)
            padded[: arr.shape[0], : arr.shape[1]] = arr
            feeds[name] = padded
        return feeds

    def build_inputs(self, images, instructions, prompt=None, image_feats=None):
        """Left-padded (inputs_embeds, attention_mask, position_ids) for a batch; `prompt` [R, d] for
        all requests or [B, R, d], one per request."""
        if len(images) != len(instructions) or not images:
            raise InputError(f"need one instruction per image, got {len(images)} images, {len(instructions)} texts")
        if prompt is not None and np.ndim(prompt) == 3 and len(prompt) != len(images):
            raise InputError(f"need one prompt per image, got {len(prompt)} prompts for {len(images)} images")
        feats = self.image_features(images) if image_feats is None else image_feats
        rows = []
        for b, text in enumerate(instructions):
            ids = prompt_ids(self.tok, self.spec, text, self.max_instruction_tokens)
            emb = self.embed[ids].astype(np.float32)
            emb[ids == self.spec.image_token_id] = feats[b].astype(np.float32)
            p = _prompt_row(prompt, b)
            if p is not None and len(p):
                emb = np.concatenate([emb[:1], np.asarray(p, np.float32), emb[1:]], axis=0)
            rows.append(emb)
        length = max(len(r) for r in rows)
        d = rows[0].shape[1]
        embeds = np.zeros((len(rows), length, d), dtype=self.float)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for b, r in enumerate(rows):
            embeds[b, length - len(r):] = r
            mask[b, length - len(r):] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        return embeds, mask, pos

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.float)
        return {f"past.{i}.{kv}": z for i in range(self.n_layers) for kv in ("key", "value")}

    def _run(self, embeds, mask, pos, past, lora_feeds, keep: int | None = None):
        """One decoder run -> (logits [B, K, V] float32, present). `keep`: logits for the last `keep`
        positions only (None or 0: every position). A bundle without the input returns every
        position whatever `keep` says: callers index from the end ([:, -1]), which reads the same."""
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos, **past, **lora_feeds}
        if keep is not None and self.keeps_logits:
            feeds[KEEP_INPUT] = np.array(keep, dtype=np.int64)
        out = self.decoder.run(None, feeds)
        present = {f"past.{i}.{kv}": out[1 + 2 * i + j] for i in range(self.n_layers)
                   for j, kv in enumerate(("key", "value"))}
        return out[0].astype(np.float32), present

    # --- decoding ------------------------------------------------------------------------------
    def generate(self, images, instructions, prompt=None, lora=None, max_new_tokens: int = 16,
                 image_feats=None) -> list[Generation]:
        embeds, mask, pos = self.build_inputs(images, instructions, prompt, image_feats)
        feeds_lora = self.lora_feeds(lora)
        batch = len(embeds)
        logits, past = self._run(embeds, mask, pos, self._empty_past(batch), feeds_lora, keep=1)
        last = logits[:, -1]
        tokens = [[] for _ in range(batch)]
        logp = np.zeros(batch)
        done = np.zeros(batch, dtype=bool)
        next_pos = pos[:, -1] + 1
        for _ in range(max_new_tokens):
            lp = _softmax_log(last)
            nxt = lp.argmax(axis=-1)
            for b in range(batch):
                if not done[b]:
                    tokens[b].append(int(nxt[b]))
                    logp[b] += lp[b, nxt[b]]
                    done[b] = nxt[b] == self.spec.eos_token_id
            if done.all():
                break
            emb = self.embed[nxt][:, None, :].astype(self.float)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            logits, past = self._run(emb, mask, next_pos[:, None], past, feeds_lora, keep=1)
            last = logits[:, -1]
            next_pos = next_pos + 1
        return [Generation(self.decode(t), t, float(np.exp(logp[b]))) for b, t in enumerate(tokens)]

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i != self.spec.eos_token_id]
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def score_answers(self, images, instructions, answers: list[str], prompt=None, lora=None,
                      image_feats=None) -> list[Scored]:
        """Pick the most probable answer of a closed set, for each image (one prefill each)."""
        if not answers:
            raise PackError("closed answer set is empty")
        feeds_lora = self.lora_feeds(lora)
        feats = self.image_features(images) if image_feats is None else image_feats
        cand = [answer_ids(self.tok, self.spec, a) for a in answers]
        n, width = len(cand), max(len(c) for c in cand)
        ids = np.zeros((n, width), dtype=np.int64)
        amask = np.zeros((n, width), dtype=np.int64)
        for k, c in enumerate(cand):
            ids[k, : len(c)] = c
            amask[k, : len(c)] = 1
        cand_embeds = self.embed[ids].astype(self.float)  # the same for every image
        results = []
        for b in range(len(images)):
            embeds, mask, pos = self.build_inputs([images[b]], [instructions[b]], _prompt_row(prompt, b),
                                                  feats[b:b + 1])
            logits, past = self._run(embeds, mask, pos, self._empty_past(1), feeds_lora, keep=1)
            first = _softmax_log(logits[0, -1])
            if width > 1:  # candidate tokens 0..width-2 predict tokens 1..width-1; the last is never fed
                rep = {k: np.repeat(v, n, axis=0) for k, v in past.items()}
                full_mask = np.concatenate([np.repeat(mask, n, axis=0), amask[:, : width - 1]], axis=1)
                apos = pos[:, -1:] + 1 + np.arange(width - 1)[None, :]
                lg, _ = self._run(cand_embeds[:, : width - 1], full_mask, np.repeat(apos, n, axis=0), rep,
                                  feeds_lora, keep=width - 1)
                lp = _softmax_log(lg)
            totals = np.array([first[c[0]] + sum(lp[k, j - 1, c[j]] for j in range(1, len(c)))
                               for k, c in enumerate(cand)])
            probs = np.exp(totals - totals.max())
            probs /= probs.sum()
            best = int(np.argmax(probs))
            results.append(Scored(answers[best], float(probs[best]), dict(zip(answers, map(float, probs)))))
        return results
