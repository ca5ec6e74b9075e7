"""The package layout and the runtime's import island."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from kaizen.runtime import cli

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ["torch", "transformers", "peft", "open_clip", "accelerate", "kaizen.trainer", "kaizen.export"]
RUNTIME_FORBIDDEN = [*FORBIDDEN, "kaizen.hub"]


def _modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_runtime_imports_no_torch():
    runtime_modules = [p.stem for p in (ROOT / "runtime").glob("*.py") if p.stem not in ("__init__", "__main__")]
    code = "import kaizen.runtime\n" + "".join(f"import kaizen.runtime.{m}\n" for m in runtime_modules)
    loaded = _modules_loaded_by(code)
    bad = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in RUNTIME_FORBIDDEN))
    assert not bad, f"kaizen.runtime pulled in {bad}"


def test_hub_imports_no_torch_and_no_trainer():
    hub_modules = [p.stem for p in (ROOT / "hub").glob("*.py") if p.stem != "__init__"]
    loaded = _modules_loaded_by("import kaizen.hub\n" + "".join(f"import kaizen.hub.{m}\n" for m in hub_modules))
    bad = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"kaizen.hub pulled in {bad}"


def test_declared_packages_match_folders():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = set(conf["tool"]["setuptools"]["packages"])
    mapping = conf["tool"]["setuptools"]["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert declared == found


def test_every_cli_target_resolves():
    for words, (target, _) in cli.COMMANDS.items():
        module, func = target.split(":")
        path = ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
        assert path.exists(), f"`kaizen {' '.join(words)}` points at missing {path}"
        assert f"def {func}(" in path.read_text(), f"{target} has no function {func}"


def test_cli_unknown_command_is_clear(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in cli.COMMANDS:
        assert " ".join(words) in out


def test_trainer_command_without_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # simulates a runtime-only station
    monkeypatch.delitem(sys.modules, "kaizen.trainer.bases", raising=False)
    with pytest.raises(cli.ExtraMissingError, match=r"kaizen-edge\[trainer\]"):
        cli.load_target("kaizen.trainer.bases:cli_init")


@pytest.mark.slow
def test_hub_extra_alone_serves_a_fleet(tmp_path):
    """`pip install '.[hub]'` into a fresh venv (no torch, no trainer deps): the fleet tests (a hub
    and station daemons on loopback) pass with that install alone."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[hub]", "pytest"], check=True, timeout=900)
    gone = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                          capture_output=True, text=True, check=True)
    assert gone.stdout.strip() == "True", "the [hub] extra pulled in torch"
    run = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fleet.py"],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
