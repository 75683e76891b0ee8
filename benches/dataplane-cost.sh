#!/usr/bin/env bash
# Dataplane cost of the compiled ruleset on a real kernel (needs root, ip, nft): new TCP
# connections/s and one-stream TCP throughput between two lab pods on different nodes with
# (a) no table, (b) the ruleset of a 10 000-pod / 1 000-policy cluster, (c) a small ruleset
# with the same first-packet path, (d) our table without policies, (e) conntrack only (a
# one-rule table, as on any node running kube-proxy), (f) (b) with the unknown-pod guard, (g) (b)
# without counters and drop log. Prints medians and ratios to (a) and
# (e), and the most conntrack entries per node; every configuration has its own lab and they
# take turns in short slices.
#   benches/dataplane-cost.sh [--rounds 15] [--slice 0.5] [--pods 10000] [--policies 1000]
#                             [--namespaces 50] [--nodes 10] [--seed 1] [--configs abcdefg]
#                             [--dump DIR] [--variant LABEL=SRC.nft,DST.nft]...
#                             [--cluster-policies N]
# --dump writes (b)'s two rulesets as nft text and stops; --variant measures a hand-edited
# pair of them as one more configuration (it must keep (b)'s policy chain names).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
# `cargo bench` builds with the release profile (the bench profile inherits it).
cargo bench --quiet --bench dataplane_cost --no-run
exec cargo bench --quiet --bench dataplane_cost -- "$@"
