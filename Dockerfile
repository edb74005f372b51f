# Roost PDS image: a release build in a Rust image, then a small Debian runtime
# that runs as an unprivileged user with its data in the /pds volume.
#
#   docker build -t roost:local .            (or: docker compose build)
#
# Base images are build arguments so a mirror, a digest pin, or local images
# (tests/bundle/check_docker.sh, which has no registry) can stand in:
#   --build-arg RUST_IMAGE=... --build-arg RUNTIME_IMAGE=...
# Works with BuildKit and the classic builder (no BuildKit-only syntax).

ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:12.15-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, in their own layer: with only Cargo.toml and Cargo.lock
# (and placeholder sources), so a rebuild after a source change reuses the
# compiled crates and takes a minute instead of ten. Cargo.lock pins every
# crate and --locked refuses to change it.
COPY Cargo.toml Cargo.lock ./
RUN set -eux; \
    mkdir -p src benches; \
    echo 'fn main() {}' > src/main.rs; \
    touch src/lib.rs; \
    echo 'fn main() {}' > benches/core.rs; \
    cargo build --release --locked --bin roost; \
    rm -rf src benches target/release/roost target/release/deps/roost-* \
        target/release/deps/libroost-* target/release/.fingerprint/roost-*
# Then Roost itself (only what the build reads, see .dockerignore).
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN cargo build --release --locked --bin roost \
 && install -D -m 0755 target/release/roost /out/roost

FROM ${RUNTIME_IMAGE} AS runtime
ARG ROOST_UID=10001
# ca-certificates: TLS to the PLC directory, relays, S3 and the AppView.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log; \
    groupadd --system --gid "${ROOST_UID}" roost; \
    useradd --system --uid "${ROOST_UID}" --gid roost --home-dir /pds --no-create-home \
        --shell /usr/sbin/nologin roost; \
    install -d -m 0700 -o roost -g roost /pds /backups
COPY --from=build /out/roost /usr/local/bin/roost
# The offline lexicons (app.bsky, chat.bsky, com.atproto, tools.ozone), from
# the pinned npm package whose SHA-512 is compiled into roost: the image then
# validates records without any network at run time. (Here, not in the build
# stage: this stage has the CA certificates the download needs.) A tarball in
# lexicon-cache/ is used instead of the registry (see lexicon-cache/README.md).
COPY lexicon-cache/ /tmp/lexicon-cache/
RUN set -eu; \
    pkg=$(find /tmp/lexicon-cache -name '*.tgz' -print -quit); \
    if [ -n "$pkg" ]; then \
        roost lexicons install --from "$pkg" --to /usr/share/roost/lexicons.json; \
    else \
        roost lexicons install --to /usr/share/roost/lexicons.json; \
    fi; \
    rm -rf /tmp/lexicon-cache
LABEL org.opencontainers.image.title="Roost" \
      org.opencontainers.image.description="A small, self-hostable AT Protocol Personal Data Server" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

# Settings for the container; everything else comes from PDS_* variables
# (see .env.example). /pds holds roost.sqlite, keys/ and disk blobs; a new
# volume mounted there takes this directory's owner (uid 10001) and mode.
ENV PDS_DATA_DIRECTORY=/pds \
    PDS_LEXICON_BUNDLE=/usr/share/roost/lexicons.json \
    PDS_LEXICON_AUTO_INSTALL=false \
    PDS_BIND_ADDRESS=0.0.0.0 \
    PDS_PORT=2583 \
    PDS_METRICS_LISTEN=0.0.0.0:9464
VOLUME ["/pds"]
WORKDIR /pds
USER ${ROOST_UID}:${ROOST_UID}
EXPOSE 2583 9464

# `roost healthcheck` asks the running server's /xrpc/_health (no curl needed).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["roost", "healthcheck"]
# Roost handles SIGTERM itself: it drains requests, closes the firehose,
# checkpoints the WAL and exits 0 (PID 1 here, so no init is needed).
STOPSIGNAL SIGTERM
ENTRYPOINT ["roost"]
CMD ["serve"]
