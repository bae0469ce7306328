#!/usr/bin/env bash
# `make test`: setup, lint and the suite in two processes, while the API server builds alongside them.
# Building kube-apiserver from source takes ~5 min on a fresh machine; waiting for it before the suite made CI
# that much longer. The build's PID is in .cache/api-server.building while it runs; tests/test_kube_apiserver.py
# waits for it (tests/conftest.py: wait_for_api_server_build), every other test runs meanwhile.
# Exit status: the tests', or the build's if only the build failed (with CI=true a failed build fails the run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
mkdir -p .cache
marker=.cache/api-server.building
log=.cache/api-server-build.log

make --no-print-directory api-server >"$log" 2>&1 &
build=$!
echo "$build" >"$marker"
make --no-print-directory setup lint helm || { kill "$build"; rm -f "$marker"; exit 1; }
"$PY" -m pytest -q -n 2 --dist loadfile "$@"
tests=$?
wait "$build"
built=$?
rm -f "$marker"
echo "--- API server build (make api-server), exit $built:"
tail -n 5 "$log"
[ "$tests" -ne 0 ] && exit "$tests"
exit "$built"
