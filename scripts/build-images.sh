#!/usr/bin/env bash
# Build the step image (images/step/Dockerfile) with podman from local bases only: no image registry is
# contacted. Where the Dockerfile's bases come from a registry, this script makes stand-ins:
#   python:3.11-slim-bookworm -> localhost/kftune-base:bookworm, Debian bookworm minbase + python3 made by
#                                debootstrap from the machine's own Debian mirror, then `podman import`
#   ghcr.io/astral-sh/uv       -> localhost/kftune-uv:<version>, the uv binary from its PyPI wheel
# and the Python packages (CPU torch included) come from a PEP 503 index on 127.0.0.1 filled by
# `pip download` on this machine, so the build itself needs no network and no extra CA.
# The trainer image is not built: its bases are NVIDIA's CUDA images (nvcc 12.8), which Debian does not ship.
#
#   scripts/build-images.sh [TAG]      TAG default: ghcr.io/kftune/kftune-step:<package version>
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${KFTUNE_IMAGES_WORK:-$PWD/.cache/images}"
UV_VERSION=$(sed -n 's|^FROM ghcr.io/astral-sh/uv:\([0-9.]*\).*|\1|p; s|^ARG UV_IMAGE=ghcr.io/astral-sh/uv:\([0-9.]*\)|\1|p' images/step/Dockerfile | head -1)
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' images/step/Dockerfile)
PSYCOPG2_VERSION=$(sed -n 's/^ARG PSYCOPG2_VERSION=//p' images/step/Dockerfile)
BOTO3_VERSION=$(sed -n 's/^ARG BOTO3_VERSION=//p' images/step/Dockerfile)
VERSION=$(python3 -c 'import re; print(re.search(r"^version = \"(.+)\"", open("pyproject.toml").read(), re.M).group(1))')
TAG="${1:-ghcr.io/kftune/kftune-step:$VERSION}"
mkdir -p "$WORK"
started=$SECONDS

for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "build-images.sh: needs $tool (apt-get install podman debootstrap)" >&2; exit 1; }
done

# 1. The Debian base: minbase + python3 + CA certificates, from the mirror apt already uses.
if ! podman image exists localhost/kftune-base:bookworm; then
    mirror=$(sed -n 's/^URIs: //p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    [ -n "$mirror" ] || mirror=$(sed -n 's/^deb \(http[^ ]*\) .*/\1/p' /etc/apt/sources.list | head -1)
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - localhost/kftune-base:bookworm >/dev/null
    rm -rf "$WORK/rootfs"
fi

# 2. uv: the binary from the PyPI wheel, alone in an image as in ghcr.io/astral-sh/uv.
if ! podman image exists "localhost/kftune-uv:$UV_VERSION"; then
    rm -rf "$WORK/uv" && mkdir -p "$WORK/uv/root"
    python3 -m pip download --quiet --no-deps --only-binary :all: --dest "$WORK/uv" "uv==$UV_VERSION"
    python3 -m zipfile -e "$WORK"/uv/uv-*.whl "$WORK/uv/wheel"
    install -m 0755 "$WORK"/uv/wheel/uv-*.data/scripts/uv "$WORK/uv/root/uv"
    tar -C "$WORK/uv/root" -c uv | podman import - "localhost/kftune-uv:$UV_VERSION" >/dev/null
    rm -rf "$WORK/uv"
fi

# 3. Every wheel the Dockerfile installs, as a simple index served on 127.0.0.1 for the build.
index="$WORK/index"
if [ ! -f "$index/complete" ]; then
    rm -rf "$index" && mkdir -p "$index/wheels"
    # Wheels where there are some; a few pinned packages (kfp-server-api) are source only, built in the image with setuptools.
    python3 -m pip download --quiet --only-binary :all: --dest "$index/wheels" "torch==$TORCH_VERSION+cpu" pip setuptools wheel
    python3 -m pip download --quiet --prefer-binary --dest "$index/wheels" --constraint requirements/lock.txt \
        --requirement <(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))') \
        "psycopg2-binary==$PSYCOPG2_VERSION" "boto3==$BOTO3_VERSION"
    python3 - "$index" <<'EOF'
import re, sys
from pathlib import Path
root = Path(sys.argv[1])
projects = {}
for file in sorted((root / "wheels").iterdir()):
    # wheel: name-version-...whl; sdist: name-version.tar.gz (the name may hold dashes)
    name = file.name.split("-")[0] if file.suffix == ".whl" else re.match(r"(.+)-\d[^-]*\.(tar\.gz|zip)$", file.name).group(1)
    projects.setdefault(re.sub(r"[-_.]+", "-", name).lower(), []).append(file.name)
for name, files in projects.items():
    page = root / "simple" / name / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("".join(f'<a href="../../wheels/{f}">{f}</a>\n' for f in files))
EOF
    touch "$index/complete"
fi
port="${KFTUNE_INDEX_PORT:-38917}"  # fixed: the index URL is a build argument, part of the layer cache key
python3 -m http.server --bind 127.0.0.1 --directory "$index" "$port" >"$WORK/index.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT

# 4. The image. chroot isolation: this machine's container runtime may not set rlimits; the build
#    shares the host network only to reach the index on 127.0.0.1.
podman build --isolation chroot --network host -f images/step/Dockerfile -t "$TAG" \
    --build-arg BASE_IMAGE=localhost/kftune-base:bookworm --build-arg "UV_IMAGE=localhost/kftune-uv:$UV_VERSION" \
    --build-arg "TORCH_INDEX=http://127.0.0.1:$port/simple" --build-arg "UV_DEFAULT_INDEX=http://127.0.0.1:$port/simple" .
echo "build-images.sh: built $TAG in $((SECONDS - started)) s"

# 5. Smoke check, in the image as its user (a RUN step: `podman run` needs rlimits this machine may refuse).
printf 'FROM %s\nRUN %s\n' "$TAG" 'id -u && kftune --help >/dev/null && mlflow server --help >/dev/null && python -c "import torch, ray, mlflow, kfp, psycopg2, boto3, kftune.steps, kftune.kube.rayjob; print(\"torch\", torch.__version__, \"ray\", ray.__version__, \"mlflow\", mlflow.__version__)"' \
    > "$WORK/Containerfile.smoke"
podman build --isolation chroot -f "$WORK/Containerfile.smoke" -t localhost/kftune-step-smoke "$WORK" 2>&1 | sed -n 's/^\(1000\|torch .*\)$/build-images.sh: smoke: \1/p'
podman rmi localhost/kftune-step-smoke >/dev/null
podman image inspect --format 'build-images.sh: {{.RepoTags}} {{.Size}} bytes, user {{.Config.User}}' "$TAG"
