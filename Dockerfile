# streamgate container image.
#
#   docker build -t streamgate .
#   docker run --rm -p 8080:8080 streamgate                  # serves conf/production.yaml
#   docker run --rm streamgate -t                            # checks the config it would serve
#   docker run --rm -p 8080:8080 -v $PWD/my-conf:/etc/streamgate:ro streamgate
#                                                            # your streamgate.yaml instead
#   docker run --rm streamgate -c /etc/streamgate/other.yaml -t    # the last -c counts
#
# The config: conf/production.yaml becomes /etc/streamgate/streamgate.yaml (the repo's
# other configs, with every key explained, are under /usr/share/streamgate/conf). The
# ENTRYPOINT names it with -c and CMD is empty, so whatever follows the image name goes to
# streamgate after it: `-t` checks exactly the config the container serves, a second `-c`
# replaces it, `health` runs the health check.
#
# Stopping: STOPSIGNAL is SIGTERM. The process stops accepting, ends its event streams at
# event boundaries with `retry:` hints spread over `sse.drain_period` (clients reconnect,
# with Last-Event-ID, to the containers that remain), lets open requests finish for
# `grace_period_seconds`, then gives the runtime `graceful_shutdown_timeout_seconds`. In
# conf/production.yaml that is 5 s, 7 s and 2 s: it exits within 9 s, inside Docker's
# default stop timeout (10 s, then SIGKILL) and Kubernetes' default
# terminationGracePeriodSeconds (30 s). A config with longer periods needs a longer stop
# timeout, above grace_period_seconds + graceful_shutdown_timeout_seconds (`streamgate -t`
# prints the sum): `docker stop -t 45`, `docker run --stop-timeout 45`, compose
# `stop_grace_period: 45s`, or Kubernetes `terminationGracePeriodSeconds: 45`. A container
# is upgraded by replacing it (streamgate is PID 1 here, so `-u` inside it would end the
# container): start the new one behind your load balancer, then stop the old one. In-place
# `-u` upgrades are for hosts and VMs, see README.md "Zero-downtime upgrade".
#
# Health: HEALTHCHECK runs `streamgate health`, which reads /etc/streamgate/streamgate.yaml
# for the admin address and token and asks `/healthz` (no curl in the image); it exits 1
# when the config has no `admin:` block. (Serving another file with `-c`? Give docker run a
# matching `--health-cmd`.) The admin listener is on
# loopback in conf/production.yaml, so nothing outside the container reaches it. To expose
# it (Kubernetes httpGet probes, Prometheus), a config of yours listens on 0.0.0.0:9901
# with `token_env: STREAMGATE_ADMIN_TOKEN` (`docker run -e STREAMGATE_ADMIN_TOKEN=...`) or
# `token_file:` (a mounted secret), and `open_probes: true` for probes without the token;
# `-p 9901:9901` then publishes it. A non-loopback admin address without a token is refused.

FROM rust:1-slim-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends cmake make g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY conf ./conf
COPY tests ./tests
COPY examples ./examples
RUN cargo build --release --locked --bin streamgate \
    && strip target/release/streamgate

FROM debian:bookworm-slim
# The system trust store: https services without a `ca_file` verify their origins with it.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin streamgate
COPY --from=build /src/target/release/streamgate /usr/local/bin/streamgate
COPY conf/production.yaml /etc/streamgate/streamgate.yaml
COPY conf/ /usr/share/streamgate/conf/
# The config keeps its pid file and upgrade socket under /tmp, which the non-root user can
# write.
USER streamgate
EXPOSE 8080
STOPSIGNAL SIGTERM
ENV RUST_LOG=info
HEALTHCHECK --interval=15s --timeout=10s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/streamgate", "health", "-c", "/etc/streamgate/streamgate.yaml"]
ENTRYPOINT ["/usr/local/bin/streamgate", "-c", "/etc/streamgate/streamgate.yaml"]
CMD []
