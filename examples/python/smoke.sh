#!/usr/bin/env bash
# End-to-end check of the Python example against a real server, on loopback only.
#   examples/python/smoke.sh target/debug/routopia-realtime
# Makes a venv (in a temp dir, or $VENV if set), installs requirements.txt, runs generate.sh,
# starts the server on 127.0.0.1:0, publishes 5 updates with client.py and expects offsets 1..5.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
server="$(realpath "${1:?usage: $0 path/to/routopia-realtime}")"
work="$(mktemp -d)"
venv="${VENV:-$work/venv}"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
PYTHON="$venv/bin/python" timeout 60 "$here/generate.sh"

# The server's first stdout line is "listening on 127.0.0.1:PORT".
mkfifo "$work/stdout"
# A secret for this run, and a token signed with it (HS256 with the standard library).
secret="smoke-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
token="$(SECRET="$secret" "$venv/bin/python" - <<'PY'
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "python-smoke", "exp": int(time.time()) + 600,
                       "subscribe": ["route:*"], "publish": ["route:*"]}).encode())
sig = hmac.new(os.environ["SECRET"].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")
PY
)"
# A low compression threshold, so batches reach the client zstd-compressed too.
ROUTOPIA_AUTH__HMAC_SECRET="$secret" ROUTOPIA_DELIVERY__COMPRESSION_THRESHOLD=64 \
    timeout 120 "$server" serve --listen 127.0.0.1:0 --shards 2 >"$work/stdout" 2>"$work/server.log" &
server_pid=$!
exec 3<"$work/stdout"
read -r -t 20 line <&3 || { echo "FAIL: server printed no address" >&2; cat "$work/server.log" >&2; exit 1; }
addr="${line#listening on }"
echo "server: $line"

status=0
timeout 30 "$venv/bin/python" "$here/client.py" --url "ws://$addr/ws" --token "$token" --channel route:42 \
    --publish 5 --count 5 --timeout 20 | tee "$work/client.out" || status=$?
offsets="$(sed -n 's/^update .*offset=\([0-9]*\) .*/\1/p' "$work/client.out" | tr '\n' ' ')"
if [[ $status -ne 0 || "$offsets" != "1 2 3 4 5 " ]]; then
    echo "FAIL: client exit $status, offsets '$offsets' (want '1 2 3 4 5 ')" >&2
    echo "--- server log" >&2; cat "$work/server.log" >&2
    exit 1
fi
kill "$server_pid"; server_status=0; wait "$server_pid" || server_status=$?; server_pid=""
echo "server stopped (exit $server_status)"
echo "PASS: 5 updates received with offsets 1..5"
