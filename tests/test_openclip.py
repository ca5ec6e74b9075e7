"""An open_clip model folder (hub layout) as the CLIP query encoder: load, tokenizer, export, runtime."""

import json
import sys

import numpy as np
import pytest
import torch

from kaizen.export.base_export import export_bundle
from kaizen.export.loading import load_clip
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.engine import Engine

INSTALL = "pip install --no-deps open_clip_torch ftfy wcwidth"
SENTENCES = ["A photo of a Cat!", "what is the colour of the  square?", "naïve café 123 don't",
             "Describe the image in one short sentence."]
MODEL_CFG = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def open_clip():
    from openclip_stubs import import_open_clip

    try:
        return import_open_clip()
    except ImportError as err:  # must not skip: the [openclip] path is part of the product
        pytest.fail(f"open_clip is not importable ({err}); install it: {INSTALL}")


@pytest.fixture(scope="module")
def oc_dir(open_clip, tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**MODEL_CFG).eval()
    with torch.no_grad():  # random init leaves the projections tiny; make the features well spread
        model.text_projection.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("openclip") / "tiny-openclip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG,
                                                              "preprocess_cfg": PREPROCESS_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder, model


def test_load_clip(oc_dir):
    folder, ref = oc_dir
    clip = load_clip(folder)
    assert clip.max_len == 32 and clip.preprocess.size == 64
    assert clip.preprocess.resize_mode == "shortest_center_crop"
    assert clip.model.config.projection_dim == 32
    t = clip.model.config.text_config
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (49406, 49407, 0)
    for key, val in ref.state_dict().items():  # the local weights, not a fresh init
        assert torch.equal(clip.model.model.state_dict()[key], val), key


def test_tokenizer_matches_open_clip(oc_dir, open_clip):
    clip = load_clip(oc_dir[0])
    oc_tok = open_clip.get_tokenizer("ViT-B-32", context_length=32)  # the OpenAI BPE, local file
    for text in SENTENCES:
        ours = clip.tokenizer.encode(text, add_special_tokens=False).ids
        theirs = oc_tok([text])[0].tolist()
        n = len(ours) + 2
        assert theirs[:n] == [49406, *ours, 49407] and not any(theirs[n:]), text


def test_export_and_runtime(oc_dir, tiny_llama, tmp_path, open_clip):
    folder, ref = oc_dir
    out = tmp_path / "bundle"
    meta = export_bundle(tiny_llama[0], out, clip_dir=folder, log=lambda *_: None)  # parity check inside
    assert meta["clip"] == {"dim": 32, "max_len": 32, "bos_token_id": 49406, "eos_token_id": 49407,
                            "pad_token_id": 0}
    assert json.loads((out / "parity.json").read_text())["clip_max_abs_diff"] < 1e-4
    got = Engine(Bundle.open(out)).clip_text(SENTENCES)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=32)(SENTENCES)
    with torch.no_grad():
        want = ref.encode_text(tokens, normalize=True).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-5)
    assert np.abs(want[0] - want[1]).max() > 1e-3  # distinct sentences give distinct embeddings


def test_missing_extra_is_clear(oc_dir, monkeypatch):
    from kaizen.runtime.errors import ExtraMissingError

    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ExtraMissingError, match=r"kaizen-edge\[openclip\]"):
        load_clip(oc_dir[0])
