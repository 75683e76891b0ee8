#!/bin/sh
# End-to-end benchmark of the real netpol-agent (see benches/agent.rs): event → rules
# committed in the kernel at 100 pod events/s, and agent RSS per cluster pod at 10 000
# and 100 000 pods. Needs root, `ip` and `nft`; everything happens in a throwaway network
# namespace that is removed afterwards (also on failure and Ctrl-C).
#
#   benches/agent-bench.sh                      # 10k pods/1k policies, then 100k/10k
#   benches/agent-bench.sh --scale-to 0         # only the 10k cluster
#   benches/agent-bench.sh --seconds 60 --debounce 10ms --agent-env MALLOC_ARENA_MAX=1
#   benches/agent-bench.sh --scale-to 0 --latencies lat.tsv   # each event's time and latency
#
# The agent is the shipped build (Cargo profile `deploy`, as the Dockerfile builds it),
# unless --agent names another binary.
set -eu
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
case " $* " in
*" --agent "* | *" --agent="*)
    exec cargo bench --bench agent -- "$@"
    ;;
esac
cargo build --profile deploy --features agent --bin netpol-agent
exec cargo bench --bench agent -- --agent "$CARGO_TARGET_DIR/deploy/netpol-agent" "$@"
