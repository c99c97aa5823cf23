# aegis-audit container image.
#
#   docker build -t aegis-audit .
#   docker run --rm -v "$PWD/my.toml:/etc/aegis-audit/aegis-audit.toml:ro" aegis-audit            # run
#   docker run --rm -e AEGIS_CONFIG=/etc/aegis-audit/docker.toml aegis-audit config check
#
# The config file comes from AEGIS_CONFIG (default /etc/aegis-audit/aegis-audit.toml, which the
# image does not ship: mount yours there or point AEGIS_CONFIG elsewhere). Every key can be
# overridden with AEGIS_<SECTION>__<KEY>. AWS credentials come from the default AWS chain
# (env, web identity / IRSA, ECS task role, instance profile) unless the file sets them.
# docker-compose.yml in this directory runs it against Kafka, MinIO and DynamoDB Local.

# ---------------------------------------------------------------- builder
# rust-version in Cargo.toml is 1.85; build with the toolchain the project is developed on.
FROM rust:1.95-bookworm AS builder

# What ops/install-deps.sh installs: librdkafka is built from source by rdkafka-sys with cmake
# (feature cmake-build); its sources include a libcurl header even though curl is not linked.
# Unpinned on purpose (DL3008): the suite's current versions, security fixes included.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        cmake libcurl4-openssl-dev pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# 1. Dependencies only, against stub sources: this layer is rebuilt only when Cargo.toml or
#    Cargo.lock change (a release build of the dependencies takes minutes, librdkafka included).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && echo 'fn main() {}' > benches/hot_path.rs \
 && cargo build --release --locked --bin aegis-audit \
 && rm -rf src \
        target/release/.fingerprint/aegis-audit-* \
        target/release/deps/aegis_audit-* \
        target/release/deps/libaegis_audit-* \
        target/release/aegis-audit* \
        target/release/libaegis_audit*

# 2. The real sources. schemas/ is only read by unit tests (include_str!), copied so that any
#    future include_str!/include_bytes! of it in non-test code still builds.
COPY src ./src
COPY schemas ./schemas
# `athena-ddl` embeds the DDL template (include_str!).
COPY ops/athena/create_table.sql ./ops/athena/create_table.sql
# COPY keeps the context's mtimes, which can be older than the stub build: touch so cargo
# rebuilds our crate (its fingerprints are also removed above).
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin aegis-audit \
 && ./target/release/aegis-audit --version

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim

# Dynamic dependencies of the binary (readelf -d): libssl.so.3 + libcrypto.so.3 (librdkafka's
# `ssl` feature), libgcc_s, libm, libc (already in the base image). zstd is linked statically;
# zlib and libcurl are not linked. ca-certificates: TLS to MSK (OpenSSL) and to AWS (rustls).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*

# Fixed numeric ids so Kubernetes' runAsNonRoot can verify USER without a passwd lookup.
RUN groupadd --system --gid 10001 aegis \
 && useradd --system --uid 10001 --gid aegis --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin aegis

COPY --from=builder /src/target/release/aegis-audit /usr/local/bin/aegis-audit
# Reference material and sample configs: example.toml (every key), local.toml, docker.toml.
COPY schemas/ /usr/share/aegis-audit/schemas/
COPY config/ /etc/aegis-audit/

ENV AEGIS_CONFIG=/etc/aegis-audit/aegis-audit.toml

USER 10001:10001

# /metrics, /healthz (alive), /readyz (in the group, backends reachable); served by `run` only,
# on [metrics] listen, which must then be 0.0.0.0:9898 (the code default is 127.0.0.1:9898).
EXPOSE 9898

# No HEALTHCHECK here: the image has no curl/wget, and the same image also runs the one-shot
# `init`, `produce` and `config check`, which serve no HTTP. docker-compose.yml gives the `run`
# service a check that uses bash's /dev/tcp; Kubernetes should probe /healthz and /readyz.

# The first SIGTERM flushes, commits and leaves the group; allow a stop grace period of
# ~30-60 s (docker stop -t 60, compose stop_grace_period, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["aegis-audit"]
CMD ["run"]
