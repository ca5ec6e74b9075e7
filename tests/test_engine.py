"""The torch-free engine: decoding, constrained scoring, batching, bad input."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kaizen.export.loading import load_base
from kaizen.export.parity import fixed_images
from kaizen.export.reference import embed_prompt
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import BundleError, InputError
from kaizen.runtime.preprocess import preprocess_batch
from kaizen.runtime.prompting import answer_ids


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(Bundle.open(tiny_llama[1], providers=["CPUExecutionProvider"]))


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_bytes_and_array_give_same_answer(engine):
    img = fixed_images(64, n=1)[0]
    a = engine.generate([img], ["How many holes?"], max_new_tokens=4)[0]
    b = engine.generate([_png(img)], ["How many holes?"], max_new_tokens=4)[0]
    assert a.token_ids == b.token_ids and 0 < a.confidence <= 1


def test_batch_with_padding_equals_single(engine):
    imgs = fixed_images(64, n=2)
    texts = ["Is it damaged?", "What colour is the cable on the bench today?"]
    batch = engine.generate(imgs, texts, max_new_tokens=5)
    single = [engine.generate([i], [t], max_new_tokens=5)[0] for i, t in zip(imgs, texts)]
    assert [g.token_ids for g in batch] == [g.token_ids for g in single]


def test_constrained_scores_match_torch(engine, tiny_llama):
    """Closed-set probabilities equal transformers' sequence log-probs, renormalised over the set."""
    base = load_base(tiny_llama[0])
    img = fixed_images(64, n=1)
    answers = ["yes", "no", "maybe not"]
    got = engine.score_answers(img, ["Is the seal torn?"], answers)[0]
    px = torch.from_numpy(preprocess_batch(img, base.preprocess))
    totals = []
    with torch.no_grad():
        for a in answers:
            emb, _ = embed_prompt(base.model, base, px, ["Is the seal torn?"])
            ids = torch.from_numpy(answer_ids(base.tokenizer, base.spec, a))[None]
            full = torch.cat([emb, base.model.get_input_embeddings()(ids)], dim=1)
            logits = base.model(inputs_embeds=full).logits.log_softmax(-1)
            n = emb.shape[1]
            totals.append(sum(float(logits[0, n - 1 + j, ids[0, j]]) for j in range(ids.shape[1])))
    ref = np.exp(np.array(totals) - max(totals))
    ref /= ref.sum()
    assert got.answer == answers[int(np.argmax(ref))]
    np.testing.assert_allclose([got.probs[a] for a in answers], ref, atol=1e-4)
    assert abs(sum(got.probs.values()) - 1) < 1e-6


def test_clip_embeddings_are_unit_norm(engine):
    t = engine.clip_text(["is the seal torn", "how many holes"])
    i = engine.clip_image(fixed_images(64, n=2))
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("image, match", [
    (b"definitely not a png", "not a readable image"),
    (np.zeros((8, 8, 4), np.uint8), r"shape \[H, W, 3\]"),
    (np.zeros((8, 8), np.uint8), r"shape \[H, W, 3\]"),
    (np.zeros((8, 8, 3), np.float32), "must be uint8"),
    (12345, "image must be"),
])
def test_bad_images_are_clear_errors(engine, image, match):
    with pytest.raises(InputError, match=match):
        engine.generate([image], ["Is it damaged?"])


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_instruction_is_refused(engine, text):
    with pytest.raises(InputError, match="instruction"):
        engine.generate(fixed_images(64, n=1), [text])


def test_missing_bundle_file_is_named(bundle_copy):
    (bundle_copy / "vision.onnx").unlink()
    with pytest.raises(BundleError, match="vision.onnx is missing"):
        Bundle.open(bundle_copy)


def test_altered_bundle_file_is_named(bundle_copy):
    with open(bundle_copy / "embed.npy", "r+b") as f:
        f.seek(200)
        f.write(b"\x01\x02\x03")
    with pytest.raises(BundleError, match="embed.npy does not match its sha256"):
        Bundle.open(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a base bundle"):
        Bundle.open(tmp_path)


def test_bad_base_json(bundle_copy):
    (bundle_copy / "base.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(BundleError, match="lacks field"):
        Bundle.open(bundle_copy)


def test_lora_of_wrong_shape_is_refused(engine):
    from kaizen.runtime.errors import PackError

    name = next(iter(engine.lora_shapes))
    with pytest.raises(PackError, match=name.replace(".", r"\.")):
        engine.lora_feeds({name: np.zeros((3, 3), np.float32)})


# ---- issue 11, findings 5 and 6: instruction tokens and image pixels are bounded -------------

def test_instruction_is_capped_in_tokens_not_characters(engine):
    """Old: the cap was 2,000 characters; 2,000 emoji are ~8,000 tokens (a station went 0.7 -> 8.6 GB)."""
    emoji = "\U0001F600" * 1900
    n = len(engine.tok.encode(emoji, add_special_tokens=False).ids)
    assert n > engine.max_instruction_tokens  # short in characters, long in tokens
    with pytest.raises(InputError, match=rf"instruction is {n} tokens long; the limit is 512 tokens"):
        engine.generate(fixed_images(64, n=1), [emoji])
    assert engine.generate(fixed_images(64, n=1), ["Is it damaged?"])[0].token_ids  # normal ones still answer


def png_header_only(width, height):
    """A PNG whose header claims width x height (decoding it would allocate width*height*3 bytes)."""
    import struct
    import zlib

    from kaizen.runtime.testpacks import tiny_png

    data = bytearray(tiny_png(0, 4))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_large_images_are_refused_before_decoding(monkeypatch):
    """Old: an 8192x8192 image was decoded (+290 MB kept); PIL's bomb guard answered `internal`."""
    import resource

    from PIL import Image

    from kaizen.runtime.preprocess import load_rgb

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=r"8000x8000 = 64000000 pixels; the limit is 25000000"):
        load_rgb(png_header_only(8000, 8000))
    with pytest.raises(InputError, match=r"the limit is 1000000"):
        load_rgb(np.zeros((2000, 600, 3), np.uint8), max_pixels=1_000_000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own guard: 2x this raises
    with pytest.raises(InputError, match="decompression bomb"):
        load_rgb(png_header_only(100, 100), max_pixels=10**9)


def test_embedding_table_is_memory_mapped_read_only(tiny_llama):
    """A station keeps the token table on disk and reads only the rows it embeds (49k x 576 fp32 =
    113 MB on real-small): a read-only memory map, not a copy in RSS; answers are unchanged."""
    eng = Engine(Bundle.open(tiny_llama[1]))
    assert isinstance(eng.embed, np.memmap) and not eng.embed.flags.writeable
    np.testing.assert_array_equal(np.asarray(eng.embed), np.load(tiny_llama[1] / "embed.npy"))
    assert eng.generate(fixed_images(64, n=1), ["Is it damaged?"], max_new_tokens=2)[0].token_ids
