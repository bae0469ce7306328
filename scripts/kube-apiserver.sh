#!/usr/bin/env bash
# A real Kubernetes API server (kube-apiserver 1.20 + etcd 3.4) on 127.0.0.1 for tests/test_kube_apiserver.py.
# No kubelet, scheduler or controllers: objects are stored, validated, defaulted and authorized, nothing runs.
#
#   scripts/kube-apiserver.sh build       kube-apiserver built from Debian's `kubernetes` source package
#                                         (golang-1.19-go, Debian's reflect2 for the vendored one), etcd from
#                                         Debian's etcd-server; both cached in $KFTUNE_K8S_CACHE/bin. Idempotent.
#   scripts/kube-apiserver.sh start DIR   start both with state in DIR; writes DIR/kubeconfig (an admin token,
#                                         the server's CA) and DIR/env (KUBE_SERVER, KUBE_TOKEN, KUBE_CA); waits for /readyz.
#   scripts/kube-apiserver.sh stop DIR    stop what `start DIR` started.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${KFTUNE_K8S_CACHE:-$PWD/.cache/k8s}"
BIN="$CACHE/bin"
GO=/usr/lib/go-1.19/bin

need_packages() {
    local missing=()
    for package in "$@"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        echo "kube-apiserver.sh: needs Debian packages ${missing[*]}: apt-get install them (as root)" >&2
        exit 1
    fi
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

deb_src() {
    # `apt-get source` needs deb-src entries: mirror the machine's own deb entries (same archive, suites).
    grep -rqs -e '^Types:.*deb-src' -e '^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/ && return
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        grep -qs debian-archive-keyring "$file" || continue  # Debian's own archive, not third-party repositories
        sed 's/^Types: deb$/Types: deb-src/' "$file" > "/etc/apt/sources.list.d/kftune-src-$(basename "$file")"
    done
    if [ -f /etc/apt/sources.list ]; then
        sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/kftune-src.list
    fi
    apt-get update -q >/dev/null
}

build() {
    mkdir -p "$BIN"
    need_packages etcd-server curl openssl
    ln -sf /usr/bin/etcd "$BIN/etcd"
    if [ -x "$BIN/kube-apiserver" ]; then
        "$BIN/kube-apiserver" --version
        return
    fi
    need_packages golang-1.19-go golang-github-modern-go-reflect2-dev dpkg-dev rsync
    deb_src
    local work="$CACHE/src" started=$SECONDS
    rm -rf "$work" && mkdir -p "$work"
    # apt checks the files against the archive's signed index (dpkg-source cannot check the uploader's key: no keyring).
    (cd "$work" && apt-get source -q --download-only kubernetes >"$work/source.log" 2>&1 \
        && dpkg-source -q -x kubernetes_*.dsc kubernetes >>"$work/source.log" 2>&1) || { cat "$work/source.log" >&2; exit 1; }
    # The vendored reflect2 1.0.1 crashes on Go >= 1.18; Debian's 1.0.2 is API-compatible.
    rm -rf "$work/kubernetes/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$work/kubernetes/vendor/github.com/modern-go/"
    # Kubernetes' own build: generates the OpenAPI code, GOPATH mode, version v1.20.2 from the source archive.
    (cd "$work/kubernetes" && PATH="$GO:$PATH" CGO_ENABLED=0 make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1) \
        || { tail -20 "$work/build.log" >&2; exit 1; }
    cp "$work/kubernetes/_output/bin/kube-apiserver" "$BIN/"
    rm -rf "$work"
    echo "kube-apiserver.sh: built kube-apiserver in $((SECONDS - started)) s"
    "$BIN/kube-apiserver" --version
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir="$1"
    [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/etcd" ] || { echo "kube-apiserver.sh: run '$0 build' first" >&2; exit 1; }
    mkdir -p "$dir/pki"
    dir=$(cd "$dir" && pwd)
    local etcd_port peer_port port token
    etcd_port=$(free_port); peer_port=$(free_port); port=$(free_port)
    token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kftune-e2e -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
        -keyout "$dir/pki/server.key" -out "$dir/pki/server.crt" 2>/dev/null
    openssl genrsa -out "$dir/pki/sa.key" 2048 2>/dev/null
    echo "$token,admin,admin,system:masters" > "$dir/pki/tokens.csv"

    "$BIN/etcd" --name kftune-e2e --data-dir "$dir/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "kftune-e2e=http://127.0.0.1:$peer_port" \
        --max-request-bytes 4194304 >"$dir/etcd.log" 2>&1 &  # the KubeRay CRDs are over etcd's 1.5 MiB default
    echo $! > "$dir/etcd.pid"

    # TTLAfterFinished: alpha in 1.20; on, so the chart's Job keeps its ttlSecondsAfterFinished (GA since 1.23).
    "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" --insecure-port 0 \
        --tls-cert-file "$dir/pki/server.crt" --tls-private-key-file "$dir/pki/server.key" \
        --token-auth-file "$dir/pki/tokens.csv" --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc --api-audiences https://kubernetes.default.svc \
        --service-account-signing-key-file "$dir/pki/sa.key" --service-account-key-file "$dir/pki/sa.key" \
        --service-cluster-ip-range 10.96.0.0/24 --feature-gates TTLAfterFinished=true \
        >"$dir/kube-apiserver.log" 2>&1 &
    echo $! > "$dir/kube-apiserver.pid"

    local server="https://127.0.0.1:$port"
    for _ in $(seq 120); do
        if curl -fsS --cacert "$dir/pki/server.crt" -H "Authorization: Bearer $token" "$server/readyz" >/dev/null 2>&1; then
            printf 'KUBE_SERVER=%s\nKUBE_TOKEN=%s\nKUBE_CA=%s\n' "$server" "$token" "$dir/pki/server.crt" > "$dir/env"
            cat > "$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "$server", certificate-authority: "$dir/pki/server.crt"}}]
users: [{name: admin, user: {token: "$token"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin, namespace: default}}]
current-context: e2e
EOF
            echo "kube-apiserver.sh: $("$BIN/kube-apiserver" --version) ready at $server (state in $dir)"
            return
        fi
        kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null || break
        sleep 1
    done
    tail -20 "$dir/kube-apiserver.log" >&2
    stop "$dir"
    echo "kube-apiserver.sh: the API server did not become ready (logs in $dir)" >&2
    exit 1
}

stop() {
    local dir="$1" pid
    for name in kube-apiserver etcd; do
        [ -f "$dir/$name.pid" ] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$dir/$name.pid"
    done
}

case "${1:-}" in
    build) build ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 build | start DIR | stop DIR" >&2; exit 2 ;;
esac
