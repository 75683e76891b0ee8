# syntax=docker/dockerfile:1
#
# netpol image: netpol-agent (the DaemonSet's entrypoint) and netpol-check.
#
#   docker build -t REGISTRY/netpol:TAG .
#
# deploy/daemonset.yaml refers to ghcr.io/netpol/netpol:0.1.0, built from this file.

# --- builder --------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
COPY . .
# The registry, git and target caches survive between builds (BuildKit cache mounts);
# the binaries are copied out of the cached target dir because cache mounts are not part
# of the image. rustls + ring need only the C compiler the slim image already has.
# Profile `deploy` (Cargo.toml): fat LTO, one codegen unit, stripped; smaller resident
# text for the agent on every node.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --profile deploy --locked --features agent --bins \
    && mkdir -p /out \
    && cp target/deploy/netpol-agent target/deploy/netpol-check /out/

# --- runtime --------------------------------------------------------------------------
# Same Debian release as the builder, so the binaries' glibc matches.
FROM debian:bookworm-slim AS runtime
LABEL org.opencontainers.image.title="netpol" \
      org.opencontainers.image.description="Kubernetes NetworkPolicy enforcement with nftables: node agent (netpol-agent) and offline checker (netpol-check)" \
      org.opencontainers.image.source="https://github.com/netpol/netpol" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# The agent sends each sync as one nf_tables netlink batch of its own; the `nft` command is
# its fallback (range changes inside an existing interval set, the first transaction after
# the kernel refused a batch) and what operators inspect the table with.
# No CA bundle: in the cluster the API server is trusted through the service account's
# ca.crt.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/netpol-agent /out/netpol-check /usr/local/bin/
# Root with only CAP_NET_ADMIN (granted by the DaemonSet); see the comment on the
# securityContext in deploy/daemonset.yaml for why not a non-root UID.
USER 0:0
ENTRYPOINT ["/usr/local/bin/netpol-agent"]
