"""decoder.onnx's optional `logits_to_keep` input: the lm_head runs on the last N positions only.

    .venv/bin/python -m pytest -q tests/test_logits_to_keep.py

What a user relies on: a prefill fed `logits_to_keep=1` returns [B, 1, V] logits equal to the last
position of the full logits; not feeding it (or 0) keeps every position; the engine's answers and
generations are the same as with full logits; a bundle exported before the input existed still
answers (the engine sees the missing input and feeds nothing).
"""

import json
import shutil

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from kaizen.export.parity import fixed_images
from kaizen.export.reference import random_lora
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.durable import sha256_file
from kaizen.runtime.engine import KEEP_INPUT, Engine
from kaizen.runtime.prompting import answer_ids

INSTRUCTIONS = ["Is the part damaged?", "How many holes does the plate have?"]
ANSWERS = ["yes", "no", "scratched surface", "two holes on the left"]  # single and multi-token


def adapter(eng: Engine):
    prompt = (np.random.default_rng(5).standard_normal((10, eng.embed.shape[1])) * 0.05).astype(np.float32)
    return prompt, random_lora(eng.lora_shapes, seed=5, scale=0.1)


def old_style_bundle(bundle, dst):
    """A copy of `bundle` whose decoder.onnx has the signature of bundles exported before
    `logits_to_keep` existed: the input removed (its 0 initializer stays a constant: all positions)."""
    shutil.copytree(bundle, dst)
    model = onnx.load(str(dst / "decoder.onnx"))
    [keep] = [i for i in model.graph.input if i.name == KEEP_INPUT]
    model.graph.input.remove(keep)
    onnx.save(model, str(dst / "decoder.onnx"))
    meta = json.loads((dst / "base.json").read_text())
    meta["files"]["decoder.onnx"] = sha256_file(dst / "decoder.onnx")
    (dst / "base.json").write_text(json.dumps(meta, indent=2))
    return dst


@pytest.fixture(scope="module")
def engines(tiny_llama, tmp_path_factory):
    new = Engine(Bundle.open(tiny_llama[1], providers=["CPUExecutionProvider"]))
    old_dir = old_style_bundle(tiny_llama[1], tmp_path_factory.mktemp("old") / "bundle")
    old = Engine(Bundle.open(old_dir, providers=["CPUExecutionProvider"]))
    return new, old


class Recorder:
    """Wraps an ORT session: records the logits shape and the logits_to_keep fed, per run."""

    def __init__(self, sess):
        self.sess, self.calls = sess, []

    def run(self, names, feeds):
        out = self.sess.run(names, feeds)
        keep = feeds.get(KEEP_INPUT)
        self.calls.append((feeds["inputs_embeds"].shape[1], None if keep is None else int(keep), out[0].shape))
        return out

    def __getattr__(self, name):
        return getattr(self.sess, name)


def test_decoder_input_is_optional_int64_defaulting_to_all(engines):
    new, old = engines
    sess = new.decoder
    optional = {i.name: i for i in sess.get_overridable_initializers()}
    assert KEEP_INPUT in optional and optional[KEEP_INPUT].type == "tensor(int64)"
    assert new.keeps_logits and not old.keeps_logits
    assert KEEP_INPUT not in {i.name for i in old.decoder.get_overridable_initializers() + old.decoder.get_inputs()}
    graph = onnx.load(str(new.bundle.path / "decoder.onnx")).graph
    [default] = [t for t in graph.initializer if t.name == KEEP_INPUT]
    assert onnx.numpy_helper.to_array(default).shape == () and int(onnx.numpy_helper.to_array(default)) == 0


def test_prefill_keep_one_is_b_1_v_and_equals_the_last_position(engines):
    eng, _ = engines
    e, m, p = eng.build_inputs(fixed_images(64), INSTRUCTIONS)
    full, _ = eng._run(e, m, p, eng._empty_past(2), {})
    vocab = eng.embed.shape[0]
    assert full.shape == (2, e.shape[1], vocab)  # not fed: every position (the old behaviour)
    for keep in (1, 3):
        kept, present = eng._run(e, m, p, eng._empty_past(2), {}, keep=keep)
        assert kept.shape == (2, keep, vocab)
        np.testing.assert_allclose(kept, full[:, -keep:], atol=1e-5, rtol=0)
        assert present["past.0.key"].shape[2] == e.shape[1]  # the KV cache still covers every position
    all_, _ = eng._run(e, m, p, eng._empty_past(2), {}, keep=0)
    np.testing.assert_array_equal(all_, full)
    big, _ = eng._run(e, m, p, eng._empty_past(2), {}, keep=e.shape[1] + 5)  # more than there is: all
    np.testing.assert_array_equal(big, full)


def test_engine_feeds_one_for_prefill_and_decode(engines, monkeypatch):
    eng, _ = engines
    rec = Recorder(eng.decoder)
    monkeypatch.setattr(eng, "decoder", rec)
    eng.generate(fixed_images(64), INSTRUCTIONS, max_new_tokens=4)
    assert rec.calls and all(keep == 1 and shape[1] == 1 for _, keep, shape in rec.calls)
    assert rec.calls[0][0] > 1  # the first run is the prefill


def test_score_answers_candidate_pass_keeps_what_it_reads(engines, monkeypatch):
    eng, _ = engines
    rec = Recorder(eng.decoder)
    monkeypatch.setattr(eng, "decoder", rec)
    eng.score_answers(fixed_images(64, n=1), INSTRUCTIONS[:1], ANSWERS)
    (prefill_len, k0, s0), (cand_len, k1, s1) = rec.calls  # one prefill, one candidate pass
    assert prefill_len > 1 and k0 == 1 and s0[1] == 1
    width = max(len(answer_ids(eng.tok, eng.spec, a)) for a in ANSWERS)  # answer tokens + EOS
    assert width > 2
    # Candidate tokens 0..width-2 predict 1..width-1: the last one (never read) is not fed.
    assert cand_len == k1 == width - 1 and s1 == (len(ANSWERS), width - 1, eng.embed.shape[0])


@pytest.mark.parametrize("adapted", [False, True], ids=["plain", "prompt+lora"])
def test_answers_and_generations_match_the_full_logits_bundle(engines, adapted):
    new, old = engines
    prompt, lora = adapter(new) if adapted else (None, None)
    images = fixed_images(64, n=3, seed=11)
    instr = INSTRUCTIONS + INSTRUCTIONS[:1]
    g_new = new.generate(images, instr, prompt, lora, max_new_tokens=6)
    g_old = old.generate(images, instr, prompt, lora, max_new_tokens=6)
    assert [g.token_ids for g in g_new] == [g.token_ids for g in g_old]
    np.testing.assert_allclose([g.confidence for g in g_new], [g.confidence for g in g_old], rtol=1e-4)
    for answers in (ANSWERS, ["yes", "no"]):
        s_new = new.score_answers(images, instr, answers, prompt, lora)
        s_old = old.score_answers(images, instr, answers, prompt, lora)
        assert [s.answer for s in s_new] == [s.answer for s in s_old]
        for a, b in zip(s_new, s_old):
            np.testing.assert_allclose([a.probs[x] for x in answers], [b.probs[x] for x in answers], atol=1e-5)


def test_old_bundle_without_the_input_still_answers(engines, monkeypatch):
    _, old = engines
    rec = Recorder(old.decoder)
    monkeypatch.setattr(old, "decoder", rec)
    [s] = old.score_answers(fixed_images(64, n=1), INSTRUCTIONS[:1], ANSWERS)
    [g] = old.generate(fixed_images(64, n=1), INSTRUCTIONS[:1], max_new_tokens=3)
    assert s.answer in ANSWERS and 0 < s.confidence <= 1 and g.token_ids
    assert all(keep is None for _, keep, _ in rec.calls)  # never fed an input the graph lacks
    assert rec.calls[0][2][1] == rec.calls[0][0]  # and it returns every position, as it always did
