"""`pip install dgemma` (no extra) is the torch-free control plane: a fresh venv, the real install, the real
command."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with `pip install <repo>`: the core dependencies only."""
    where = tmp_path_factory.mktemp("core-venv")
    venv.EnvBuilder(with_pip=True).create(where)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(where / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return where


def _run(venv_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv_dir / "bin" / "dgemma"), *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=venv_dir)


def test_the_core_install_has_no_model_stack(core_venv: Path) -> None:
    out = subprocess.run([str(core_venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                         capture_output=True, text=True, timeout=120)
    installed = {line.split("==")[0].lower() for line in out.stdout.splitlines()}
    assert "dgemma" in installed
    assert not installed & {"torch", "transformers", "tokenizers", "safetensors"}, sorted(installed)


@pytest.mark.parametrize("command", ["gateway", "operator"])
def test_the_control_plane_commands_run_without_torch(core_venv: Path, command: str) -> None:
    out = _run(core_venv, command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: dgemma" in out.stdout


@pytest.mark.parametrize("command", ["worker", "serve", "generate"])
def test_a_worker_command_names_the_extra_it_needs(core_venv: Path, command: str) -> None:
    out = _run(core_venv, command, "--help")
    assert out.returncode == 2
    assert out.stderr.strip() == (f"dgemma {command}: needs the 'worker' extra (torch is not installed): "
                                  "pip install 'dgemma[worker]'")


def test_the_command_lists_only_subcommands_that_exist(core_venv: Path) -> None:
    out = _run(core_venv, "--help")
    assert out.returncode == 0
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ") and line.split()]
    assert listed == ["serve", "worker", "gateway", "operator", "generate", "make-tiny-model"]
