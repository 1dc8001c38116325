# modelcache-csi image (with modelcachectl for `kubectl exec`). Built from the repository root:
#   docker build -t modelcache-csi:dev .
# The node plugin needs mount(8) from util-linux (k8s.io/mount-utils execs it
# for bind mounts), so the runtime image is a slim Debian, not scratch.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd ./cmd
COPY pkg ./pkg
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/modelcache-csi ./cmd/modelcache-csi && \
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/modelcachectl ./cmd/modelcachectl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends mount ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/modelcache-csi /out/modelcachectl /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/modelcache-csi"]
