"""deploy/ and docs/DEPLOY.md: the example configs, systemd units, Dockerfiles, requirements,
and every `kaizen ...` command the docs quote, checked against the real code (provision.sh:
tests/test_provision.py).

Offline and fast: nothing is built or installed. Commands are checked by resolving them in
runtime/cli.py's COMMANDS, reading their `--help`, and running their own argparse parser on
the quoted arguments (the command body is never run: parsing stops right after argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

from kaizen.hub.config import load_hub_config
from kaizen.runtime.cli import COMMANDS, load_target, main, resolve
from kaizen.runtime.config import load_station_config
from kaizen.runtime.errors import ExtraMissingError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = {"kaizen-station.service": ("station", "serve", "station.toml"),
         "kaizen-hub.service": ("hub", "serve", "hub.toml")}
DOCS = [ROOT / "docs" / "DEPLOY.md", DEPLOY / "README.md"]
VENV_BIN = ROOT / ".venv" / "bin"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "CapabilityBoundingSet": "",
    "LockPersonality": "yes",
    "SystemCallFilter": "@system-service",
    "Restart": "on-failure",
    "User": "kaizen",
}


# ---------------------------------------------------------------- helpers


class _Parsed(Exception):
    pass


def parse_only(argv: list[str]) -> argparse.Namespace:
    """Run the command's own argparse on argv and stop there; AssertionError if it rejects it."""
    try:
        words, rest = resolve(argv)
    except KeyError:
        raise AssertionError(f"`kaizen {' '.join(argv)}`: no such command in runtime/cli.py COMMANDS") from None
    try:
        func = load_target(COMMANDS[words][0])
    except ExtraMissingError as err:
        pytest.skip(f"kaizen {' '.join(words)}: {err}")
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = original(self, args, namespace)
        if extras:
            raise AssertionError(f"`kaizen {' '.join(argv)}`: unrecognized arguments {extras}")
        raise _Parsed(ns)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args):
        try:
            func(rest)
        except _Parsed as parsed:
            return parsed.args[0]
        except SystemExit as err:
            raise AssertionError(f"`kaizen {' '.join(argv)}`: argparse rejected it (exit {err.code})") from None
    raise AssertionError(f"`kaizen {' '.join(argv)}`: the command did not parse its arguments with argparse")


_HELP: dict[tuple[str, ...], str] = {}


def help_text(words: tuple[str, ...], capsys) -> str:
    if words not in _HELP:
        capsys.readouterr()
        try:
            main([*words, "--help"])
        except SystemExit:
            pass
        _HELP[words] = capsys.readouterr().out
    return _HELP[words]


def kaizen_argv(line: str) -> list[str] | None:
    """argv after `kaizen` if the shell line runs kaizen (optionally via sudo -u USER / a venv path)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    if tokens[:1] == ["sudo"]:
        tokens = tokens[3:] if tokens[1:2] == ["-u"] else tokens[1:]
    if not tokens or not (tokens[0] == "kaizen" or tokens[0].endswith("/bin/kaizen")):
        return None
    return tokens[1:]


def doc_commands(path: Path) -> list[list[str]]:
    """Every kaizen command line inside the ``` code blocks (indented ones too) of a Markdown file."""
    out = []
    for block in re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", path.read_text(), flags=re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            argv = kaizen_argv(line.strip())
            if argv is not None:
                out.append(argv)
    return out


def inline_commands(path: Path) -> list[list[str]]:
    """`kaizen ...` spans in the prose (often partial, e.g. `kaizen pack sign --key`)."""
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    out = []
    for span in re.findall(r"`(kaizen [^`]+)`", text):
        argv = kaizen_argv(" ".join(span.split()))
        if argv and not argv[0].startswith("-"):
            out.append(argv)
    return out


def unit_directives(path: Path) -> dict[str, list[str]]:
    """Key -> values (in order) of a systemd unit file; comments and section headers dropped."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pip_commands(instructions) -> list[str]:
    cmds = []
    for word, rest in instructions:
        if word == "RUN":
            cmds += [c.strip() for c in re.split(r"&&|;", rest) if re.search(r"\bpip3? install\b", c)]
    return cmds


def requirement_names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower())
    return names


def exec_form(rest: str) -> list[str]:
    return json.loads(rest[rest.index("["):])


def container_argv(instructions) -> list[str]:
    entry = [exec_form(r) for w, r in instructions if w == "ENTRYPOINT"][-1]
    cmd = [exec_form(r) for w, r in instructions if w == "CMD"][-1]
    return entry + cmd


def healthcheck_argv(instructions) -> list[str]:
    rest = [r for w, r in instructions if w == "HEALTHCHECK"][-1]
    return exec_form(rest[rest.index("CMD"):])


# ---------------------------------------------------------------- example configs


def test_example_configs_parse_and_use_the_service_folders():
    station = load_station_config(DEPLOY / "station.toml")
    hub = load_hub_config(DEPLOY / "hub.toml")
    for path in (station.store_dir, station.state_dir):
        assert path.is_relative_to("/var/lib/kaizen"), path
    assert station.inference_endpoint.startswith("ipc:///run/kaizen/")
    for path in (hub.packs_dir, hub.db_path):   # ProtectSystem=strict: only the state dir is writable
        assert path.is_relative_to("/var/lib/kaizen"), path
    assert station.station_id in hub.station_ids()


# ---------------------------------------------------------------- systemd units


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_runs_an_existing_kaizen_command_with_the_example_config(unit):
    group, verb, config_name = UNITS[unit]
    d = unit_directives(DEPLOY / "systemd" / unit)
    (exec_start,) = d["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/kaizen/venv/bin/kaizen"
    words, _ = resolve(argv[1:])
    assert words == (group, verb) and words in COMMANDS
    ns = parse_only(argv[1:])
    assert Path(ns.config).name == config_name and (DEPLOY / config_name).is_file()
    assert str(ns.config) == f"/etc/kaizen/{config_name}"


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit_is_hardened(unit):
    d = unit_directives(DEPLOY / "systemd" / unit)
    for key, value in HARDENING.items():
        assert d.get(key) == [value], (unit, key, d.get(key))
    assert d["Group"] == ["kaizen"]
    assert float(d["RestartSec"][0].rstrip("s")) > 0
    families = d["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert d["MemoryDenyWriteExecute"][0] in ("yes", "no")
    text = (DEPLOY / "systemd" / unit).read_text()
    assert re.search(r"#.*\n(#.*\n)*MemoryDenyWriteExecute=", text), "say why MemoryDenyWriteExecute is set so"
    assert "HF_HUB_OFFLINE=1" in d["Environment"]
    assert "kaizen" in d["StateDirectory"][0].split()
    rw = d["ReadWritePaths"][0].split()
    assert "/var/lib/kaizen" in rw
    if unit == "kaizen-station.service":  # the inference socket ipc:///run/kaizen/station.ipc
        assert d["RuntimeDirectory"] == ["kaizen"] and "/run/kaizen" in rw
    assert d["WantedBy"] == ["multi-user.target"]


def test_unit_state_folders_hold_every_path_the_configs_write():
    station = load_station_config(DEPLOY / "station.toml")
    hub = load_hub_config(DEPLOY / "hub.toml")
    st = unit_directives(DEPLOY / "systemd" / "kaizen-station.service")
    hb = unit_directives(DEPLOY / "systemd" / "kaizen-hub.service")
    st_dirs = [Path("/var/lib") / s for s in st["StateDirectory"][0].split()]
    st_dirs += [Path("/run") / s for s in st["RuntimeDirectory"][0].split()]
    socket_path = Path(station.inference_endpoint.removeprefix("ipc://"))
    for path in (station.store_dir, station.state_dir, socket_path):
        assert any(path.is_relative_to(d) for d in st_dirs), path
    hb_dirs = [Path("/var/lib") / s for s in hb["StateDirectory"][0].split()]
    for path in (hub.packs_dir, hub.db_path.parent):
        assert any(path.is_relative_to(d) for d in hb_dirs), path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify():
    units = [str(DEPLOY / "systemd" / u) for u in sorted(UNITS)]
    proc = subprocess.run(["systemd-analyze", "verify", *units], check=False, capture_output=True, text=True, timeout=60)
    # /opt/kaizen/venv does not exist on a build machine: that is the only complaint allowed.
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if ln.strip() and "/opt/kaizen/venv/bin/kaizen is not executable" not in ln]
    assert not problems, problems


# ---------------------------------------------------------------- requirements and Dockerfiles


def test_station_requirements_swap_onnxruntime_for_the_gpu_build():
    gpu = requirement_names(DEPLOY / "requirements-station-gpu.txt")
    cpu = requirement_names(DEPLOY / "requirements-station-cpu.txt")
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    for names in (gpu, cpu):
        assert not {"torch", "transformers", "peft", "accelerate", "open_clip_torch"} & set(names)
    from kaizen.runtime.config import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    default = sorted(re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps)
    assert sorted(cpu) == default
    assert sorted(gpu) == sorted("onnxruntime-gpu" if n == "onnxruntime" else n for n in default)


def test_station_image_installs_the_runtime_only():
    ins = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile.station")
    pips = pip_commands(ins)
    assert any("requirements-station-gpu.txt" in c for c in pips), pips
    assert any(re.search(r"pip install --no-deps \.(\s|$)", c) for c in pips), pips
    for c in pips:
        assert "torch" not in c and "transformers" not in c, c
        assert "[" not in c, f"no extras in the station image: {c}"
        assert not re.search(r"\bonnxruntime\b(?!-gpu)", c), c
        assert "--no-deps" in c or "-r " in c, f"a plain `pip install` would pull the CPU onnxruntime: {c}"
    copies = " ".join(r for w, r in ins if w == "COPY")
    assert "requirements-station-cpu" not in copies
    assert [r for w, r in ins if w == "USER"][-1] not in ("root", "0")
    assert parse_only(container_argv(ins)[1:]).config == Path("/etc/kaizen/station.toml")
    assert container_argv(ins)[:3] == ["kaizen", "station", "serve"]


def test_hub_image_installs_the_trainer_extra_with_pinned_torch():
    ins = dockerfile_instructions(DEPLOY / "docker" / "Dockerfile.hub")
    pips = pip_commands(ins)
    assert any(".[trainer]" in c for c in pips), pips
    for c in pips:
        assert "onnxruntime-gpu" not in c, c
    from kaizen.runtime.config import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "torch==2.13.0" in extras["trainer"]
    assert "onnxruntime-gpu" not in " ".join(extras["trainer"])  # .[trainer] keeps one onnxruntime
    arg = next(r for w, r in ins if w == "ARG")
    assert "2.13.0" in arg, arg
    assert [r for w, r in ins if w == "USER"][-1] not in ("root", "0")
    argv = container_argv(ins)
    assert argv[:3] == ["kaizen", "hub", "serve"]
    assert parse_only(argv[1:]).config == Path("/etc/kaizen/hub.toml")
    hub = load_hub_config(DEPLOY / "hub.toml")
    exposed = {int(p) for w, r in ins if w == "EXPOSE" for p in r.split()}
    assert exposed == {int(hub.bind.rsplit(":", 1)[1]), int(hub.pub_bind.rsplit(":", 1)[1])}


@pytest.mark.parametrize("name", ["Dockerfile.station", "Dockerfile.hub"])
def test_dockerfile_copies_only_repository_paths(name):
    for word, rest in dockerfile_instructions(DEPLOY / "docker" / name):
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for src in sources:
                if src == "README.md":
                    continue  # pyproject's readme; see test_packaging
                assert (ROOT / src).exists(), f"{name}: COPY {src}: not in the repository"


class _StubStation:
    def infer(self, image, instruction, task=None):
        return {"answer": "ok"}

    def status(self):
        return {"packs": []}


def _run_healthcheck(argv, config: Path, timeout: float = 30):
    argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    env = dict(os.environ, KAIZEN_CONFIG=str(config))
    return subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=timeout)


def test_station_healthcheck_asks_the_inference_endpoint():
    from kaizen.runtime.endpoint import InferenceServer

    argv = healthcheck_argv(dockerfile_instructions(DEPLOY / "docker" / "Dockerfile.station"))
    folder = Path(tempfile.mkdtemp(prefix="kzhc"))  # short: ipc paths are limited to ~100 chars
    try:
        endpoint = f"ipc://{folder}/station.ipc"
        text = re.sub(r'(?m)^inference_endpoint = "[^"]*"', f'inference_endpoint = "{endpoint}"',
                      (DEPLOY / "station.toml").read_text())
        config = folder / "station.toml"
        config.write_text(text)
        assert load_station_config(config).inference_endpoint == endpoint
        server = InferenceServer(_StubStation(), endpoint).start()
        try:
            ok = _run_healthcheck(argv, config)
        finally:
            server.stop()
        assert ok.returncode == 0, ok.stderr
        down = _run_healthcheck(argv, config)   # nobody serving: times out (5 s) and fails
        assert down.returncode != 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_hub_healthcheck_connects_to_the_bind_port(tmp_path):
    argv = healthcheck_argv(dockerfile_instructions(DEPLOY / "docker" / "Dockerfile.hub"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    text = re.sub(r'(?m)^bind = "[^"]*"', f'bind = "tcp://0.0.0.0:{port}"', (DEPLOY / "hub.toml").read_text())
    config = tmp_path / "hub.toml"
    config.write_text(text)
    try:
        ok = _run_healthcheck(argv, config)
    finally:
        listener.close()
    assert ok.returncode == 0, ok.stderr
    assert _run_healthcheck(argv, config).returncode != 0


# ---------------------------------------------------------------- commands quoted in the docs


def _all_doc_commands():
    return [(path.relative_to(ROOT).as_posix(), argv) for path in DOCS for argv in doc_commands(path)]


def test_docs_quote_kaizen_commands():
    found = {doc for doc, _ in _all_doc_commands()}
    assert found == {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert len(_all_doc_commands()) >= 10


@pytest.mark.parametrize("doc,argv", _all_doc_commands(),
                         ids=[f"{d}:{' '.join(a[:2])}" for d, a in _all_doc_commands()])
def test_doc_command_exists_and_its_flags_parse(doc, argv, capsys):
    words, rest = resolve(argv)  # KeyError = not in COMMANDS
    assert words in COMMANDS
    text = help_text(words, capsys)
    for token in rest:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                f"{doc}: `kaizen {' '.join(argv)}`: {flag} is not in `kaizen {' '.join(words)} --help`"
    parse_only(argv)


def _all_inline_commands():
    return [(path.relative_to(ROOT).as_posix(), argv) for path in DOCS for argv in inline_commands(path)]


@pytest.mark.parametrize("doc,argv", _all_inline_commands(),
                         ids=[f"{d}:{' '.join(a[:2])}" for d, a in _all_inline_commands()])
def test_inline_doc_command_exists_and_has_its_flags(doc, argv, capsys):
    words, rest = resolve(argv)  # KeyError = not in COMMANDS
    text = help_text(words, capsys)
    for token in rest:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                f"{doc}: `kaizen {' '.join(argv)}`: {flag} is not in `kaizen {' '.join(words)} --help`"
