# Kinesin container image: a multi-stage build, a non-root minimal runtime.
#   docker build -t kinesin:0.1.0 .
#   docker run -p 7450:7450 -p 7451:7451 -p 7452:7452 kinesin:0.1.0
# The Helm chart (deploy/k8s/helm/kinesin) runs this image.

FROM rust:1.95-bookworm AS build
# libclang: rust-rocksdb's bindgen; mold: the linker named in .cargo/config.toml.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev mold \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Shown in kinesin_build_info{revision}: docker build --build-arg KINESIN_REVISION=$(git rev-parse --short HEAD)
ARG KINESIN_REVISION=unknown
ENV KINESIN_REVISION=$KINESIN_REVISION
RUN cargo build --release --locked -p kinesin-server \
 && cp target/release/kinesin /usr/local/bin/kinesin

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 kinesin \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/kinesin --no-create-home kinesin \
 && mkdir -p /var/lib/kinesin && chown kinesin:kinesin /var/lib/kinesin
COPY --from=build /usr/local/bin/kinesin /usr/local/bin/kinesin
USER 10001:10001
VOLUME /var/lib/kinesin
# AWS API, native gRPC (and Raft), admin (/metrics, /health/*).
EXPOSE 7450 7451 7452
ENTRYPOINT ["kinesin"]
# A single node by default. These are flags, so they win over KINESIN_*
# environment variables: to configure by environment or file, pass your own
# command (e.g. `server --config /etc/kinesin/kinesin.toml`), as the chart does.
# This default is for trying Kinesin: --insecure-dev accepts any request on
# the AWS API and --insecure-internal anyone on the internal port. Give
# credentials and internal TLS (and drop the flags) for anything others reach.
CMD ["server", "--data-dir", "/var/lib/kinesin", "--listen-api", "0.0.0.0:7450", \
     "--listen-grpc", "0.0.0.0:7451", "--listen-admin", "0.0.0.0:7452", "--replication-factor", "1", \
     "--insecure-dev", "--insecure-internal"]
