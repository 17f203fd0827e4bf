#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn test cases (through kosoku, which runs Autobahn's
# case files under Python 3) against the server's echo endpoint, and fails on any case that
# is not OK, NON-STRICT or INFORMATIONAL.
#
#   tests/autobahn/run.sh [BINARY]      # default target/release/routopia-realtime
#
# Environment: KOSOKU_VENV (default /tmp/kosoku-venv; created and kosoku installed from PyPI
# when missing), AUTOBAHN_REPORTS (default target/autobahn: index.json and HTML reports),
# AUTOBAHN_PARALLELISM (default 4), AUTOBAHN_CASES (cases to run, default all but 12.* and
# 13.*, the permessage-deflate sections: the server does not offer the extension).
set -euo pipefail
cd "$(dirname "$0")/../.."

binary=${1:-target/release/routopia-realtime}
venv=${KOSOKU_VENV:-/tmp/kosoku-venv}
reports=${AUTOBAHN_REPORTS:-target/autobahn}
parallelism=${AUTOBAHN_PARALLELISM:-4}

if [ ! -x "$binary" ]; then
  echo "no server binary at $binary (cargo build --release)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/kosoku" ]; then
  python3 -m venv "$venv"
  # The version this server was checked with; a newer one may bring new cases.
  "$venv/bin/pip" install --quiet "kosoku==0.1.0"
fi

log=$(mktemp)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -f "$log"
}
trap cleanup EXIT

# The echo endpoint is a testing aid, off unless set. Limits differ from the defaults only
# where the suite needs it: section 9 sends messages of up to 16 MiB (production: 64 KiB),
# whose echoes must fit the outbox; heartbeat pings would be events the cases do not expect;
# kosoku opens connections faster than a phone reconnects.
ROUTOPIA_TESTING__ECHO_ENDPOINT=true \
ROUTOPIA_LIMITS__MAX_MESSAGE_SIZE=$((17 * 1024 * 1024)) \
ROUTOPIA_LIMITS__MAX_OUTBOX_BYTES=$((17 * 1024 * 1024)) \
ROUTOPIA_HEARTBEAT__INTERVAL=1h \
ROUTOPIA_HEARTBEAT__TIMEOUT=2h \
ROUTOPIA_RATE_LIMITS__CONNECTION_ATTEMPTS_PER_IP__REQUESTS=0 \
ROUTOPIA_LOG_LEVEL=warn \
  "$binary" serve --listen 127.0.0.1:0 --shards 2 >"$log" 2>&1 &
server_pid=$!
addr=
for _ in $(seq 1 100); do
  addr=$(sed -n 's/^listening on //p' "$log")
  [ -n "$addr" ] && break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "the server did not start:" >&2; cat "$log" >&2; exit 1
fi

selection=()
if [ -n "${AUTOBAHN_CASES:-}" ]; then
  # `read -a` splits on spaces without expanding the globs against files here.
  read -r -a cases <<<"$AUTOBAHN_CASES"
  for case in "${cases[@]}"; do selection+=(-i "$case"); done
else
  selection=(-x '12.*' -x '13.*')
fi
rm -rf "$reports"
started=$(date +%s)
# kosoku exits non-zero when a case fails; index.json decides below.
"$venv/bin/kosoku" -m fuzzingclient -p "$parallelism" -o "$reports" "${selection[@]}" "ws://$addr/echo" || true
elapsed=$(( $(date +%s) - started ))

if [ ! -f "$reports/index.json" ]; then
  echo "kosoku wrote no report; server log:" >&2; cat "$log" >&2; exit 1
fi
python3 - "$reports/index.json" "$elapsed" <<'PY'
import collections, json, sys
index = json.load(open(sys.argv[1]))
passing = {"OK", "NON-STRICT", "INFORMATIONAL"}
counts = collections.Counter()
bad = []
for agent, cases in index.items():
    for case, result in sorted(cases.items(), key=lambda kv: [int(p) for p in kv[0].split(".")]):
        counts[result["behavior"]] += 1
        if result["behavior"] not in passing or result["behaviorClose"] not in passing:
            bad.append(f"{case}: {result['behavior']} / close {result['behaviorClose']} (code {result['remoteCloseCode']})")
        elif result["behavior"] != "OK" or result["behaviorClose"] != "OK":
            print(f"{case}: {result['behavior']} / close {result['behaviorClose']}")
for line in bad:
    print(f"FAILED {line}")
summary = ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
print(f"autobahn: {sum(counts.values())} cases in {sys.argv[2]} s: {summary}; {len(bad)} not passing")
sys.exit(1 if bad or not counts else 0)
PY
