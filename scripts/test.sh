#!/usr/bin/env bash
# Installs what the tests need and runs every test. This is the README's test command and
# what CI runs. Kernel tests need root and nft, the picture tests graphviz and chromium;
# under CI=true they fail rather than skip.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v time >/dev/null 2>&1 || [ -x /usr/bin/time ] || need+=(time)
# matrix -o dot is rendered with Graphviz, matrix -o html clicked in headless Chromium.
command -v dot >/dev/null 2>&1 || need+=(graphviz)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]}: install them (e.g. sudo apt-get install -y ${need[*]})" >&2
  fi
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets --all-features -- -D warnings
# The default build is the CLI alone (with --cluster): it must stand without the agent's
# code; and without the cluster feature, without any Kubernetes client.
cargo clippy --locked --bin netpol-check -- -D warnings
cargo clippy --locked --no-default-features --bin netpol-check -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast
fi
