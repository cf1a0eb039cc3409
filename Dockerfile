# syntax=docker/dockerfile:1
# The Nodemesh image: one binary, `mesh-node`, run as the node agent (`mesh-node run`, the
# DaemonSet) and as the cluster CA (`mesh-node ca`, the Deployment), plus a static build of
# the same binary that the agent installs on each node as the CNI plugin (`nodemesh-cni`).
#
#   docker build -t <registry>/nodemesh/mesh-node:0.1.0 .
#
# Then set `image.repository` (Helm) or the image in deploy/manifests/ to where you pushed it.

ARG RUST_VERSION=1.95

# --- build ---
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# The eBPF programs build with nightly (with rust-src, for the BPF target's core library);
# the CNI plugin is built for musl, statically linked.
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && rustup target add x86_64-unknown-linux-musl \
 && apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
COPY . .
# bpf-linker, built against the nightly toolchain's own LLVM, exactly as on a developer's
# machine (README, "The two commands"): one recipe, not a second one to keep in step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo xtask setup --build-only
# mesh-node/build.rs compiles the eBPF object and embeds it in the binary. The agent links
# glibc (its allocator serves the proxy); the plugin runs on the host, whose C library is
# unknown, so it is the static musl build of the same code.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -j2 -p mesh-node --bin mesh-node \
 && cargo build --release --locked -j2 -p mesh-node --bin mesh-node \
        --target x86_64-unknown-linux-musl \
 && install -D target/release/mesh-node /out/mesh-node \
 && install -D target/x86_64-unknown-linux-musl/release/mesh-node /out/nodemesh-cni

# --- run ---
# glibc and libgcc only (what the agent links), no shell, no package manager. The agent
# runs as root with the capabilities the DaemonSet grants; the CA as distroless' nonroot.
FROM gcr.io/distroless/cc-debian12
COPY --from=builder /out/mesh-node /usr/local/bin/mesh-node
# Copied onto each node by the agent (`--cni-plugin-binary`).
COPY --from=builder /out/nodemesh-cni /usr/local/lib/nodemesh/nodemesh-cni
ENTRYPOINT ["/usr/local/bin/mesh-node"]
CMD ["--help"]
