# syntax=docker/dockerfile:1

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src

# The whole context (minus .dockerignore) so build scripts, benches or other
# targets added later keep working; the cache mounts keep rebuilds incremental.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/cachefence /out/cachefence

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

RUN groupadd --system --gid 10001 cachefence \
 && useradd --system --uid 10001 --gid cachefence --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin cachefence

COPY --from=build /out/cachefence /usr/local/bin/cachefence

USER 10001:10001
EXPOSE 6380

# cachefence handles SIGTERM/SIGINT itself (graceful drain), so it can run as PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cachefence"]
# The upstream is host:port; "redis" is e.g. a compose service name.
CMD ["--listen", "0.0.0.0:6380", "--upstream", "redis:6379"]
