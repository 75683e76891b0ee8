#!/usr/bin/env bash
# Runs netpol-check's main job on every bundled example: one reachability matrix each.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin netpol-check
bin=${CARGO_TARGET_DIR:-target}/release/netpol-check
for dir in policy-examples/*/; do
  echo "=== ${dir%/}: $(sed -n 's/^name: //p' "$dir/expect.yaml" 2>/dev/null)"
  "$bin" matrix -f "$dir" "$@" 2>/dev/null
  echo
done
