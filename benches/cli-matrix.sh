#!/usr/bin/env bash
# The issue-2 bar, end to end: `netpol-check matrix` over a generated cluster, every declared
# port and protocol, output included. Prints the median wall time and peak RSS of 5 runs.
#   benches/cli-matrix.sh [PODS] [POLICIES] [FORMAT]     (default 1000 300 json)
set -euo pipefail
cd "$(dirname "$0")/.."
pods=${1:-1000}; policies=${2:-300}; format=${3:-json}
cargo build --release --quiet --bin netpol-check
bin=${CARGO_TARGET_DIR:-target}/release/netpol-check
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$bin" generate --pods "$pods" --policies "$policies" --namespaces 20 --nodes 10 > "$work/cluster.yaml"
times=()
for _ in 1 2 3 4 5; do
  /usr/bin/time -f '%e %M' -o "$work/t" "$bin" matrix -f "$work/cluster.yaml" -o "$format" > "$work/out"
  times+=("$(cat "$work/t")")
done
printf '%s\n' "${times[@]}" | sort -n | awk -v p="$pods" -v q="$policies" -v f="$format" -v bytes="$(stat -c %s "$work/out")" \
  'NR==3 { printf "netpol-check matrix: %d pods, %d policies, -o %s: median %.2f s wall, %.0f MiB peak RSS, %.1f MiB output\n", p, q, f, $1, $2/1024, bytes/1048576 }'
