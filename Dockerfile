# Wick, CPU build. `docker build -t wick .` then
# `docker run -p 8080:8080 -v /models:/models wick --model /models/model.gguf`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin wick

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 wick
COPY --from=build /src/target/release/wick /usr/local/bin/wick
COPY config/default.toml /etc/wick/default.toml
USER wick
EXPOSE 8080
ENV WICK_HOST=0.0.0.0 WICK_PORT=8080
ENTRYPOINT ["wick", "serve", "--config", "/etc/wick/default.toml"]
