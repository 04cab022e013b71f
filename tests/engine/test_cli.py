"""The `dgemma` command as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def dgemma(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dgemma_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_generate_prints_text_and_a_stats_line(tiny_dir: Path) -> None:
    out = dgemma("generate", "--model", str(tiny_dir), "--max-new-tokens", "20", "--steps", "3", "--seed", "1",
                 "--stream", "Why is the sky blue?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "tokens, " in out.stderr and "canvases" in out.stderr and "decoder passes" in out.stderr


def test_generate_is_reproducible_with_a_seed(tiny_dir: Path) -> None:
    args = ("generate", "--model", str(tiny_dir), "--max-new-tokens", "32", "--steps", "2", "--seed", "7", "hi")
    assert dgemma(*args).stdout == dgemma(*args).stdout


def test_generate_rejects_a_bad_setting_naming_it(tiny_dir: Path) -> None:
    out = dgemma("generate", "--model", str(tiny_dir), "--steps", "0", "hi")
    assert out.returncode == 2
    assert "max_denoising_steps:" in out.stderr and "greater than or equal to 1, got 0" in out.stderr


def test_generate_without_a_model_speaks_english_and_stops_canvases_early() -> None:
    """The bundled trained checkpoint: real words, valid UTF-8, fewer decoder passes than the 48-step cap."""
    out = dgemma("generate", "--max-new-tokens", "64", "--seed", "1", "Say hello in one sentence.",
                 env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "\ufffd" not in out.stdout and re.search(r"[A-Za-z]{3,} [A-Za-z]{3,} [A-Za-z]{3,}", out.stdout), out.stdout
    found = re.search(r"(\d+) canvases, (\d+) decoder passes", out.stderr)
    assert found, out.stderr
    canvases, passes = int(found.group(1)), int(found.group(2))
    assert canvases >= 1 and passes < canvases * 48, out.stderr


def test_make_tiny_model_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = dgemma("make-tiny-model", str(tmp_path / "m"), "--seed", "3")
    assert out.returncode == 0, out.stderr
    written = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= written


def test_generate_takes_images_and_counts_their_tokens(tiny_dir: Path, tmp_path: Path) -> None:
    from dgemma_common.images import VisionSpec, soft_tokens
    from dgemma_worker.model import TINY_MAX_SOFT_TOKENS
    from tests.common.imagefiles import image_bytes, truncated

    picture = tmp_path / "picture.jpg"
    picture.write_bytes(image_bytes("JPEG", (300, 200)))
    common = ("generate", "--model", str(tiny_dir), "--max-new-tokens", "8", "--steps", "2", "--seed", "1")
    plain = dgemma(*common, "What is this?")
    shown = dgemma(*common, "--image", str(picture), "What is this?")
    assert plain.returncode == 0 and shown.returncode == 0, shown.stderr

    def prompt_tokens(out: subprocess.CompletedProcess[str]) -> int:
        return int(out.stderr.split(" prompt tokens")[0].rsplit("] ", 1)[1])

    image_tokens = soft_tokens(300, 200, VisionSpec(max_soft_tokens=TINY_MAX_SOFT_TOKENS)) + 2
    assert prompt_tokens(shown) == prompt_tokens(plain) + image_tokens
    broken = tmp_path / "broken.png"
    broken.write_bytes(truncated(image_bytes("PNG", (300, 200))))
    out = dgemma(*common, "--image", str(picture), "--image", str(broken), "hi")
    assert out.returncode == 2
    assert "prompt.chat.messages[0].parts[1]: the image is truncated or corrupt" in out.stderr


def test_generate_with_the_compiled_step_prints_what_the_eager_step_does(tiny_dir: Path) -> None:
    args = ("generate", "--model", str(tiny_dir), "--max-new-tokens", "32", "--steps", "2", "--seed", "7", "--raw",
            "hi")
    compiled, eager = dgemma(*args, "--compile", timeout=600), dgemma(*args, "--no-compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and compiled.stdout.strip()
