"""Built-in tiny bases: same classes as the real models, deterministic, clear loading errors."""

import json

import pytest

from kaizen.export.loading import base_fingerprint
from kaizen.runtime.errors import BundleError
from kaizen.trainer.bases import init_base, load_base, load_clip


def test_tiny_llama_has_real_classes(tiny_llama):
    base = load_base(tiny_llama[0])
    assert type(base.model).__name__ == "LlavaForConditionalGeneration"
    assert base.model.config.text_config.model_type == "llama"
    assert base.model.config.vision_config.model_type == "clip_vision_model"
    clip = load_clip(tiny_llama[0] / "clip")
    assert type(clip.model).__name__ == "CLIPModel"


def test_tiny_qwen2_is_qwen2(tiny_qwen2):
    assert load_base(tiny_qwen2[0]).model.config.text_config.model_type == "qwen2"


def test_init_is_deterministic_in_seed(tmp_path, tiny_llama):
    init_base("tiny-llama", tmp_path / "again", seed=0)
    init_base("tiny-llama", tmp_path / "other", seed=1)
    fp = lambda d: base_fingerprint(load_base(d), load_clip(d / "clip"))
    assert fp(tmp_path / "again") == fp(tiny_llama[0])
    assert fp(tmp_path / "other") != fp(tiny_llama[0])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_base(tmp_path / "nope")


def test_non_llava_checkpoint_is_refused(tiny_llama):
    with pytest.raises(BundleError, match="model_type 'clip'"):
        load_base(tiny_llama[0] / "clip")


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(BundleError, match="no config.json"):
        load_base(tmp_path / "x")


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown base preset"):
        init_base("huge", tmp_path / "h")


def test_kaizen_base_json_records_preset(tiny_llama):
    info = json.loads((tiny_llama[0] / "kaizen_base.json").read_text())
    assert info["preset"]["name"] == "tiny-llama" and "{instruction}" in info["prompt_template"]
