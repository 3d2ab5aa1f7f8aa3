# echo-worker: API and worker in one image (README "Deploying"). Two stages: a Rust build, then a small Debian
# runtime with ffmpeg/ffprobe (the only tools the service runs) and a non-root user. No Docker daemon runs in this
# project's CI, so the image itself is not built there; .ci/run exercises the same steps instead: it installs the
# runtime packages below with apt and runs the same `cargo build --release --locked`, and tests/deploy.rs keeps this
# file, render.yaml and Procfile in line with the code (commands, health path, variable names).

FROM rust:1.85-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
 && install -m 0755 target/release/echo-worker /usr/local/bin/echo-worker

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /home/echo echo \
 && install -d -o echo -g echo /var/lib/echo /tmp/echo
COPY --from=build /usr/local/bin/echo-worker /usr/local/bin/echo-worker
USER echo
WORKDIR /var/lib/echo
# The pipelines and plugins are embedded in the binary; mount folders and set ECHO_PATHS__PIPELINES /
# ECHO_PATHS__PLUGINS to use your own.
ENV PORT=3001 \
    NODE_ENV=production \
    TEMP_DIR=/tmp/echo \
    ECHO_PATHS__STORAGE_ROOT=/var/lib/echo/storage \
    ECHO_SERVER__HOST=0.0.0.0
EXPOSE 3001
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" > /dev/null || exit 1
CMD ["echo-worker", "serve"]
