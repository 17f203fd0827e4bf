#!/usr/bin/env bash
# Side-by-side 1→N fan-out runs of routopia-realtime and the peer servers (shared/peers), each
# server pinned to one core and the load generator to another, all on loopback, every step bounded
# in time. Prints one table; keeps every report (JSON lines) and server log in the output folder.
#
#   loadtest/compare.sh                               # N=1000, C=1, R=2000 msg/s, D=10 s, 64 B
#   loadtest/compare.sh --rates "1000 2000 4000 8000" # capacity sweep
#   loadtest/compare.sh --subscribers 10000 --rates 100 --servers "routopia bun"
#   loadtest/compare.sh --scenario request-reply      # peers in echo mode, replies per server CPU-s
#   loadtest/compare.sh --repeat 5 --rates 2000       # five alternated rounds, medians and the ratio
#   loadtest/compare.sh --baseline old/routopia-realtime --servers "routopia baseline" --repeat 5
#   loadtest/compare.sh --latency-set --repeat 2        # latency at N=10,000 × 100 and × 300 msg/s
#                                                     # and N=1,000 × 2,000 and × 4,000 msg/s
#                                                     # this build against another, alternated
#
# See loadtest/README.md for every option and how to read the numbers.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

rates="2000"
subscribers=1000
channels=1
publishers=1
duration=10
payload=64
servers="routopia bun tokio node"
baseline_bin=""
# Loads as N:rate pairs; empty: --subscribers at each of --rates.
loads=""
peers_dir=/tmp/routopia-peers
peers_src=""
out=""
build=1
bound_ms=50
server_core=1
generator_core=0
max_rss_mb=4096
extra_args=""
scenario=""
repeat=1
# With --scenario, only the flags given here are passed on (the scenario presets the rest).
given=""

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF
Options:
  --rates "R..."        publish rates to sweep, msg/s over all publishers (default: $rates)
  --latency-set         instead of --subscribers and --rates, the loads latency is judged at:
                        N=10,000 at 100 and 300 msg/s, N=1,000 at 2,000 and 4,000 msg/s
  --subscribers N       subscriber connections (default: $subscribers)
  --channels C          routopia channels (peers always broadcast to all; C>1 skips them) (default: $channels)
  --publishers P        publisher connections (default: $publishers)
  --duration D          seconds of publishing per run; keep it ≤ 10 on a shared machine (default: $duration)
  --payload S           payload bytes, at least 16 (default: $payload)
  --servers "..."       any of: routopia baseline bun tokio node (default: "$servers")
  --baseline BIN        another routopia-realtime binary, run as server "baseline" (before/after)
  --bound-ms MS         p99 / publisher-lag bound for the "held" verdict (default: $bound_ms)
  --peers-dir DIR       where the peers are (built there by shared/peers/setup.sh if missing) (default: $peers_dir)
  --peers-src DIR       the peers' sources with setup.sh (default: shared/peers next to the repo, or /work/shared/peers)
  --out DIR             where reports and logs go (default: a new /tmp/routopia-compare.XXXX)
  --no-build            use the release binaries already in target/release
  --server-core N       core the server is pinned to (default: $server_core)
  --generator-core N    core the load generator is pinned to (default: $generator_core)
  --max-server-rss-mb M kill a server whose RSS passes M MiB (default: $max_rss_mb)
  --loadtest-args "..." more flags for routopia-loadtest (e.g. "--drain-timeout 3")
  --repeat K            run every server K times per rate, alternating servers round by round;
                        the table ends with each server's median and our ratio to the best
                        peer's (the machine's noise is ±10–15 % a run) (default: $repeat)
  --scenario NAME       a routopia-loadtest scenario (fanout-1k, fanout-10k, many-channels,
                        request-reply, connect-storm, idle-memory); request-reply starts the
                        peers in echo mode. Only the flags given here override its presets.
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --rates) rates=$2; given="$given rate"; shift 2 ;;
    --latency-set) loads="10000:100 10000:300 1000:2000 1000:4000"; subscribers=10000; shift ;;
    --subscribers|-n) subscribers=$2; given="$given subscribers"; shift 2 ;;
    --channels|-c) channels=$2; given="$given channels"; shift 2 ;;
    --publishers|-p) publishers=$2; given="$given publishers"; shift 2 ;;
    --duration|-d) duration=$2; given="$given duration"; shift 2 ;;
    --payload|-s) payload=$2; given="$given payload"; shift 2 ;;
    --scenario) scenario=$2; shift 2 ;;
    --servers) servers=$2; shift 2 ;;
    --baseline) baseline_bin=$2; shift 2 ;;
    --bound-ms) bound_ms=$2; shift 2 ;;
    --peers-dir) peers_dir=$2; shift 2 ;;
    --peers-src) peers_src=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --server-core) server_core=$2; shift 2 ;;
    --generator-core) generator_core=$2; shift 2 ;;
    --max-server-rss-mb) max_rss_mb=$2; shift 2 ;;
    --loadtest-args) extra_args=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
case $repeat in '' | *[!0-9]* | 0) die "--repeat takes a positive count" ;; esac

[ -n "$out" ] || out=$(mktemp -d /tmp/routopia-compare.XXXX)
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"

# Sockets: N subscribers in the generator, N more in the server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((subscribers + 100)) ]; then
  die "ulimit -n is $(ulimit -n): too low for $subscribers subscribers"
fi

# ---- build
need_peers=0
for s in $servers; do
  case $s in
    routopia) ;;
    baseline) [ -x "$baseline_bin" ] || die "server 'baseline' needs --baseline BIN (an executable)" ;;
    bun|tokio|node) need_peers=1 ;;
    *) die "unknown server '$s' (routopia baseline bun tokio node)" ;;
  esac
done
bun_bin="$peers_dir/node/node_modules/@oven/bun-linux-x64/bin/bun"
if [ $need_peers = 1 ]; then
  if [ -x "$peers_dir/bin/peer-tokio-tungstenite" ] && [ -x "$bun_bin" ] && [ -d "$peers_dir/node/node_modules/ws" ]; then
    log "peers already built in $peers_dir"
  else
    if [ -z "$peers_src" ]; then
      for candidate in "$root/../shared/peers" /work/shared/peers; do
        [ -x "$candidate/setup.sh" ] && { peers_src=$candidate; break; }
      done
    fi
    [ -n "$peers_src" ] && [ -x "$peers_src/setup.sh" ] || die "peers not built and no setup.sh found (give --peers-src)"
    log "building the peers into $peers_dir (once)"
    timeout 1200 "$peers_src/setup.sh" "$peers_dir" >"$out/peers-setup.log" 2>&1 ||
      die "peer setup failed; see $out/peers-setup.log"
  fi
fi
if [ $build = 1 ]; then
  log "building routopia-realtime and routopia-loadtest (release)"
  (cd "$root" && timeout 1800 cargo build --release --quiet -p routopia-realtime -p routopia-loadtest) ||
    die "release build failed"
fi
server_bin="$root/target/release/routopia-realtime"
loadtest_bin="$root/target/release/routopia-loadtest"
[ -x "$loadtest_bin" ] || die "$loadtest_bin missing (build without --no-build)"

# ---- helpers
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Ports below the kernel's ephemeral range: runs with thousands of connections leave client
# ports in TIME-WAIT all over that range, and a peer could not bind one of them.
ephemeral_low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "${ephemeral_low:-0}" -gt 10100 ] || ephemeral_low=32768
free_port() {
  local port tries=0
  while [ $tries -lt 200 ]; do
    port=$((10000 + RANDOM % (ephemeral_low - 10000)))
    if ! port_in_use "$port"; then echo "$port"; return 0; fi
    tries=$((tries + 1))
  done
  return 1
}

server_pid=""
watchdog_pid=""

stop_server() {
  if [ -n "$watchdog_pid" ]; then
    kill "$watchdog_pid" 2>/dev/null || true
    wait "$watchdog_pid" 2>/dev/null || true
    watchdog_pid=""
  fi
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

# Starts server $1 on port $2, pinned; sets server_pid. Logs to $3.
start_server() {
  local name=$1 port=$2 logfile=$3
  case $name in
    routopia | baseline)
      local bin=$server_bin
      [ "$name" = baseline ] && bin=$baseline_bin
      [ -x "$bin" ] || die "$bin missing"
      # The server pins its shard to the first core taskset allows. The peers check no
      # tokens and limit nothing, so for a like-for-like run neither does routopia-realtime;
      # every generated connection comes from 127.0.0.1, so the per-address limit is lifted.
      ROUTOPIA_LOG_LEVEL=${ROUTOPIA_LOG_LEVEL:-warn} ROUTOPIA_AUTH__MODE=disabled ROUTOPIA_RATE_LIMITS__ENABLED=false \
        ROUTOPIA_LIMITS__MAX_CONNECTIONS_PER_IP=1000000 \
        taskset -c "$server_core" "$bin" serve --listen "127.0.0.1:$port" --shards 1 >"$logfile" 2>&1 &
      ;;
    bun) taskset -c "$server_core" "$bun_bin" "$peers_dir/node/bun_server.js" "$port" "$peer_mode" >"$logfile" 2>&1 & ;;
    tokio) taskset -c "$server_core" "$peers_dir/bin/peer-tokio-tungstenite" "$port" "$peer_mode" >"$logfile" 2>&1 & ;;
    node) taskset -c "$server_core" node "$peers_dir/node/ws_server.js" "$port" "$peer_mode" >"$logfile" 2>&1 & ;;
  esac
  server_pid=$!
  local deadline=$((SECONDS + 15))
  while [ $SECONDS -lt $deadline ]; do
    kill -0 "$server_pid" 2>/dev/null || { log "$name exited at start; see $logfile"; server_pid=""; return 1; }
    if port_in_use "$port"; then
      if { [ "$name" != routopia ] && [ "$name" != baseline ]; } || grep -q "listening on" "$logfile"; then
        # A watchdog so that no server can eat the machine's memory.
        (
          while kill -0 "$server_pid" 2>/dev/null; do
            rss=$(awk '/^VmRSS:/{print int($2/1024)}' "/proc/$server_pid/status" 2>/dev/null || echo 0)
            if [ "${rss:-0}" -gt "$max_rss_mb" ]; then
              echo "[compare] watchdog: $name RSS ${rss} MiB > $max_rss_mb MiB, killed" >>"$logfile"
              kill -KILL "$server_pid" 2>/dev/null
              exit 0
            fi
            sleep 0.5
          done
        ) &
        watchdog_pid=$!
        return 0
      fi
    fi
    sleep 0.1
  done
  log "$name did not start listening within 15 s; see $logfile"
  stop_server
  return 1
}

peer_mode=broadcast
[ "$scenario" = request-reply ] && peer_mode=echo

# The flags for one loadtest run at rate $1.
run_flags() {
  if [ -z "$scenario" ]; then
    echo "--subscribers $subscribers --channels $channels --publishers $publishers --rate $1" \
      "--duration $duration --payload $payload --setup-timeout $setup_timeout"
    return
  fi
  local flags="--scenario $scenario"
  for g in $given; do
    case $g in
      rate)
        flags="$flags --rate $1"
        # A rate only means something to request/reply in open loop.
        [ "$scenario" = request-reply ] && flags="$flags --open-loop"
        ;;
      subscribers) flags="$flags --subscribers $subscribers --setup-timeout $setup_timeout" ;;
      channels) flags="$flags --channels $channels" ;;
      publishers) flags="$flags --publishers $publishers" ;;
      duration) flags="$flags --duration $duration" ;;
      payload) flags="$flags --payload $payload" ;;
    esac
  done
  echo "$flags"
}

drain_timeout=5
if [ -z "$loads" ]; then
  for rate in $rates; do loads="$loads $subscribers:$rate"; done
else
  given="$given subscribers rate"
fi

log "results in $out"
for load in $loads; do
  subscribers=${load%:*}
  rate=${load#*:}
  setup_timeout=$((30 + subscribers / 200))
  run_bound=$((setup_timeout + duration + drain_timeout + 30))
  # Scenarios may preset up to 10,000 connections with a 120 s setup bound.
  [ -n "$scenario" ] && [ $run_bound -lt 240 ] && run_bound=240
  for round in $(seq "$repeat"); do
    run_id="n$subscribers-r$rate"
    [ "$repeat" -gt 1 ] && run_id="n$subscribers-r$rate-k$round"
    for name in $servers; do
      case $name in routopia | baseline) mode=routopia ;; *) mode=raw ;; esac
      label=$name
      [ "$name" = routopia ] && label=routopia-realtime
      [ "$name" = baseline ] && label=routopia-baseline
      if [ "$mode" = raw ] && { [ "$channels" != 1 ] || [ "$scenario" = many-channels ]; }; then
        log "skipping $name: the peers only broadcast (C=1)"
        continue
      fi
      port=$(free_port) || die "no free port"
      logfile="$out/$name-$run_id.log"
      if ! start_server "$name" "$port" "$logfile"; then
        printf '{"label":"%s","params":{"subscribers":%s,"rate":%s},"fatal":"server did not start"}\n' \
          "$label" "$subscribers" "$rate" >>"$results"
        continue
      fi
      log "$label: N=$subscribers C=$channels P=$publishers R=$rate D=${duration}s S=${payload}B round $round/$repeat (port $port, pid $server_pid)"
      report="$out/$name-$run_id.json"
      # shellcheck disable=SC2086,SC2046 # flags are lists of words
      if timeout -k 5 "$run_bound" taskset -c "$generator_core" "$loadtest_bin" \
        --addr "127.0.0.1:$port" --mode "$mode" --label "$label" --server-pid "$server_pid" \
        $(run_flags "$rate") --bound-ms "$bound_ms" --drain-timeout "$drain_timeout" $extra_args --json \
        >"$report" 2>"$out/$name-$run_id.loadtest.err"; then
        :
      else
        log "$label at $rate msg/s: loadtest exited with $? (see $out/$name-$run_id.loadtest.err)"
      fi
      if [ -s "$report" ]; then
        head -n 1 "$report" >>"$results"
      else
        printf '{"label":"%s","params":{"subscribers":%s,"rate":%s},"fatal":"no report (timeout or crash)"}\n' \
          "$label" "$subscribers" "$rate" >>"$results"
      fi
      if ! kill -0 "$server_pid" 2>/dev/null; then
        log "$label died during the run; see $logfile"
      fi
      stop_server
      sleep 1
    done
  done
done

echo
if [ -n "$scenario" ]; then
  echo "scenario $scenario (peers in $peer_mode mode), flags given:${given:- none};" \
    "server on core $server_core, generator on core $generator_core; $(date -u +%Y-%m-%dT%H:%MZ)"
else echo "1→N fan-out: N:rate $(echo $loads), C=$channels, P=$publishers, D=${duration}s, ${payload} B payload;" \
  "server on core $server_core, generator on core $generator_core; $(date -u +%Y-%m-%dT%H:%MZ)"
fi
"$loadtest_bin" table "$results"
echo
echo "reports and logs: $out"
