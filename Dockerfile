# Builds the switchyard binary, then copies it into a small runtime image with the schemas
# and the compose configuration.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin switchyard

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY schemas /etc/switchyard/schemas
COPY deploy/compose/switchyard.toml /etc/switchyard/switchyard.toml
ENV SWITCHYARD_SCHEMA_DIR=/etc/switchyard/schemas
# An unprivileged user; the image writes nothing to disk.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["switchyard"]
CMD ["serve", "--config", "/etc/switchyard/switchyard.toml"]
