#!/usr/bin/env bash
# The peers of the router benchmark, measured side by side in ONE run on this
# machine. bench/run.py (bench/run.sh) calls it with the router as an extra target.
#
#   direct           one static nginx upstream, no proxy (upstream-nginx.conf:
#                    127.0.0.1:18001-18004): the ceiling
#   nginx            nginx hashing the session to an upstream (proxy-nginx.conf, :18100)
#   haproxy          HAProxy doing the same (proxy-haproxy.cfg, :18200)
#   minimal-aiohttp  the same idea in a few lines of aiohttp
#                    (minimal_aiohttp_proxy.py, :18300): the floor for Python
#   "NAME PORT"      every argument: an extra target already listening on PORT
#
# Every target gets the workload of sessions.lua twice: 32 connections for DUR
# seconds (rps, p50, p99), then one connection for 3 s (c1_p50: what the hop
# adds at no load). One line per target:
#   == NAME rps=... p50=... p99=... c1_p50=... [Non-2xx / Socket errors lines]
# Everything shares the same cores: compare ratios inside one run, not absolutes.
#
# Needs nginx, haproxy, wrk (Debian packages) and a Python with aiohttp (PY).
#   DUR=8 PY=.venv/bin/python bench/peers/peers.sh "router 18400"
set -u

peers=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
DUR=${DUR:-8}
LUA="$peers/sessions.lua"
OWN_PORTS=(18001 18002 18003 18004 18100 18200 18300)

for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null || { echo "peers.sh: $tool is not installed" >&2; exit 1; }
done

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in "${OWN_PORTS[@]}"; do
  if listening "$port"; then
    echo "peers.sh: 127.0.0.1:$port is already in use (another benchmark run?)" >&2
    exit 1
  fi
done

rundir=$(mktemp -d)
pids=()
stop_peers() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$rundir"
}
trap stop_peers EXIT

nginx -p "$rundir" -e stderr -c "$peers/upstream-nginx.conf" 2>"$rundir/upstream.log" &
pids+=($!)
nginx -p "$rundir" -e stderr -c "$peers/proxy-nginx.conf" 2>"$rundir/proxy.log" &
pids+=($!)
haproxy -db -f "$peers/proxy-haproxy.cfg" >"$rundir/haproxy.log" 2>&1 &
pids+=($!)
"$PY" "$peers/minimal_aiohttp_proxy.py" 18300 >"$rundir/minimal.log" 2>&1 &
pids+=($!)

# Up to 10 s for every peer to listen; a peer that died shows its log.
for port in "${OWN_PORTS[@]}"; do
  for _ in $(seq 100); do
    listening "$port" && continue 2
    sleep 0.1
  done
  echo "peers.sh: nothing listens on 127.0.0.1:$port after 10 s" >&2
  tail -n 20 "$rundir"/*.log "$rundir"/*.err >&2 2>/dev/null
  exit 1
done

measure() {  # NAME PORT
  local url="http://127.0.0.1:$2" loaded idle
  loaded=$(wrk -t1 -c32 -d"${DUR}s" --latency -s "$LUA" "$url" | awk '
    /^Requests\/sec:/ { rps = $2 }
    $1 == "50%" { p50 = $2 }
    $1 == "99%" { p99 = $2 }
    /Non-2xx|Socket errors/ { errors = errors " " $0 }
    END { printf "rps=%s p50=%s p99=%s%s", rps, p50, p99, errors }')
  idle=$(wrk -t1 -c1 -d3s --latency -s "$LUA" "$url" | awk '$1 == "50%" { printf "c1_p50=%s", $2 }')
  echo "== $1 $loaded $idle"
}

for target in "direct 18001" "nginx 18100" "haproxy 18200" "minimal-aiohttp 18300" "$@"; do
  read -r name port <<<"$target"
  measure "$name" "$port"
done
