"""The Dockerfiles (not buildable here: no Docker engine) are parsed and held to the image rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from dgemma_operator import children
from tests.deploy.helpers import ROOT, one, render

IMAGES = {
    "worker": ROOT / "images" / "worker" / "Dockerfile",
    "control": ROOT / "images" / "control" / "Dockerfile",
}
SECRET_NAMES = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL)", re.IGNORECASE)


@dataclass
class Instruction:
    keyword: str
    args: str


def parse(text: str) -> tuple[list[Instruction], str]:
    """Instructions (continuation lines joined) and the comments."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comments.append(stripped)
            continue
        if not stripped and not current:
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = current.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
            current = ""
    return instructions, "\n".join(comments)


def base_images(instructions: list[Instruction]) -> list[str]:
    """Every FROM image, with ARG defaults substituted."""
    args = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            args[name] = value
    images = []
    for i in instructions:
        if i.keyword == "FROM":
            image = i.args.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
            if image not in {
                s.args.split()[-1] for s in instructions if s.keyword == "FROM" and " AS " in s.args
            }:
                images.append(image)
    return images


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned_by_tag(name: str) -> None:
    instructions, _ = parse(IMAGES[name].read_text())
    images = base_images(instructions)
    assert images
    for image in images:
        assert "$" not in image, f"unresolved base image {image}"
        repository, _, tag = (
            image.rpartition("@")[0].rpartition(":") if "@" in image else image.rpartition(":")
        )
        assert repository and tag and tag != "latest", f"{image} is not pinned by tag"
        assert re.search(r"\d", tag), f"{image}: pin a versioned tag"


@pytest.mark.parametrize("name", IMAGES)
def test_images_run_as_a_non_root_user_and_hold_no_secrets(name: str) -> None:
    instructions, comments = parse(IMAGES[name].read_text())
    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users, "USER must be set"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid, so runAsNonRoot can verify it"
    for i in instructions:
        if i.keyword in ("ENV", "ARG", "LABEL"):
            for match in re.finditer(r"(\w+)=", i.args):
                assert not SECRET_NAMES.search(match.group(1)), (
                    f"{i.keyword} {match.group(1)} looks like a secret"
                )
        if i.keyword in ("COPY", "ADD"):
            assert not re.search(r"(\.env|id_rsa|\.netrc|credentials|\.pem|\.key)\b", i.args), i.args
            assert "http" not in i.args, "ADD from a URL is not reproducible"
    entrypoint = next(i.args for i in instructions if i.keyword == "ENTRYPOINT")
    assert entrypoint == '["dgemma"]'
    assert any(i.keyword == "HEALTHCHECK" for i in instructions) or "probe" in comments.lower()


@pytest.mark.parametrize("name", IMAGES)
def test_images_are_multi_arch_aware(name: str) -> None:
    text = IMAGES[name].read_text()
    assert "--platform linux/amd64,linux/arm64" in text
    assert "ARG TARGETARCH" in text


def test_the_worker_image_has_cuda_torch_and_a_model_cache() -> None:
    instructions, _ = parse(IMAGES["worker"].read_text())
    assert all("cuda" in image for image in base_images(instructions))
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "download.pytorch.org/whl/cu" in IMAGES["worker"].read_text() and "torch==" in installs
    assert "mkdir -p /models" in installs and "chown 1000:1000 /models" in installs
    assert 'VOLUME ["/models"]' in IMAGES["worker"].read_text()
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    assert "HF_HOME=/models/huggingface" in env


def test_the_control_image_uses_a_slim_python_base() -> None:
    instructions, _ = parse(IMAGES["control"].read_text())
    assert all(re.match(r"python:[\d.]+-slim", image) for image in base_images(instructions))


def _uid(name: str) -> int:
    instructions, _ = parse(IMAGES[name].read_text())
    return int([i.args for i in instructions if i.keyword == "USER"][-1].split(":")[0])


def test_image_users_match_the_pod_security_contexts() -> None:
    spec = children.models.DiffusionGemmaSpec.model_validate(
        {"servedModelName": "m", "model": {"huggingFace": {"id": "a/b"}}, "image": "i"}
    )
    owner = {"metadata": {"name": "x", "namespace": "n", "uid": "u"}}
    worker_pod = children.deployment(owner, spec)["spec"]["template"]["spec"]
    assert worker_pod["securityContext"]["runAsUser"] == _uid("worker")
    gateway_pod = one(render(), "Deployment", "dgemma-gateway")["spec"]["template"]["spec"]
    assert gateway_pod["securityContext"]["runAsUser"] == _uid("control")


def test_the_build_context_leaves_out_what_the_images_do_not_need() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


@pytest.mark.parametrize("name", IMAGES)
def test_images_copy_every_package_folder_the_project_installs(name: str) -> None:
    import tomllib

    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    instructions, _ = parse(IMAGES[name].read_text())
    copied = {i.args.split()[0] for i in instructions if i.keyword == "COPY" and "--from" not in i.args}
    assert set(folders) <= copied


def test_the_control_image_installs_the_core_without_the_model_stack() -> None:
    instructions, _ = parse(IMAGES["control"].read_text())
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "pip install /src " in installs and "[worker]" not in installs
    assert "torch" not in installs.replace("find_spec('torch') is None", "")


def test_the_worker_image_installs_the_worker_extra() -> None:
    instructions, _ = parse(IMAGES["worker"].read_text())
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert 'pip install "/src[worker]"' in installs
