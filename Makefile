# modelcache — build, test and demo.
#
#   make demo    the main job end to end on this machine (needs root)
#   make test    lint, unit, integration (root, MinIO, real mounts),
#                csi-sanity and the CachedModel reconciler against a real
#                kube-apiserver and etcd (built into bin/ the first time)
#   make e2e     the DaemonSet on a real single-node Kubernetes (root; builds
#                kube-apiserver, kubelet and etcd into bin/ the first time)
#   make bench   benchmarks (never part of make test)
#
# Tools the tests need are built from Go modules at pinned versions into the
# git-ignored bin/. A stamp file per version rebuilds a tool when its pin
# changes and never otherwise.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

GO      ?= go
BIN     := $(CURDIR)/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
# The Dockerfile builds the same way (test/manifests checks it).
BUILDFLAGS := -trimpath -ldflags '$(LDFLAGS)'

MINIO_MODULE       := github.com/minio/minio
MINIO_VERSION      := v0.0.0-20260212201848-7aac2a2c5b7c
CSI_SANITY_MODULE  := github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
CSI_SANITY_VERSION := v5.6.0
# kustomize v5.8.3 needs Go 1.27; v5.8.1 is the newest that builds with go.mod's Go.
KUSTOMIZE_MODULE   := sigs.k8s.io/kustomize/kustomize/v5
KUSTOMIZE_VERSION  := v5.8.1
HELM_MODULE        := helm.sh/helm/v3/cmd/helm
HELM_VERSION       := v3.22.0
# The rclone CLI that test/benchrun runs as the storage initializer would: the
# same version as the rclone library in go.mod, so the comparison is fair.
RCLONE_MODULE      := github.com/rclone/rclone
RCLONE_VERSION     := $(shell awk '$$1 == "$(RCLONE_MODULE)" { print $$2 }' go.mod)

# csi-sanity runs against --mode=all (identity, controller and node on one
# socket) in two passes; test/sanity says how.
#
# SANITY_WRITER_SPECS: the specs that create their volume with
# SINGLE_NODE_WRITER, which csi-sanity v5 hard-codes with no option to
# change. A modelcache volume is a read-only model cache and CreateVolume
# refuses writer modes by design, so these specs cannot pass as written. The
# first pass skips them; the second pass runs exactly these specs through a
# proxy that asks for MULTI_NODE_READER_ONLY (a ReadOnlyMany claim) instead,
# so every one of them still runs against the real controller and node.
SANITY_WRITER_SPECS := Node Service (NodeUnpublishVolume should remove target path|NodeGetVolumeStats should fail when volume does not exist on the specified path|should work|should be idempotent)|CreateVolume should (return appropriate values SingleNodeWriter|not fail when requesting to create a volume with already existing name|fail when requesting to create a volume with already existing name|not fail when creating volume with maximum-length name)|DeleteVolume should return appropriate values|ValidateVolumeCapabilities should (fail when no volume capabilities are provided|return appropriate values)
# SANITY_SKIP: specs skipped in both passes. None: every other spec either
# passes or skips itself because the driver does not advertise the
# capability it tests (snapshots, expansion, staging, ControllerPublish...).
SANITY_SKIP :=

GOTEST_FLAGS ?=

.PHONY: help
help:
	@echo "make demo     cold then warm publish of a generated model from a loopback MinIO (root)"
	@echo "make test     lint, unit, integration, csi-sanity and fleet (apiserver) tests (root)"
	@echo "make e2e      the node plugin's image as a DaemonSet on a real single-node Kubernetes (root)"
	@echo "make bench    benchmarks"
	@echo "make build    bin/modelcache-csi and bin/modelcachectl"
	@echo "make tools    bin/minio, bin/csi-sanity, bin/kustomize and bin/helm at their pinned versions"

.PHONY: build
build:
	CGO_ENABLED=0 $(GO) build $(BUILDFLAGS) -o $(BIN)/modelcache-csi ./cmd/modelcache-csi
	CGO_ENABLED=0 $(GO) build $(BUILDFLAGS) -o $(BIN)/modelcachectl ./cmd/modelcachectl

# --- pinned tools ----------------------------------------------------------

$(BIN)/.minio-$(MINIO_VERSION):
	@mkdir -p $(BIN)
	@echo "building MinIO $(MINIO_VERSION) into bin/ (several minutes on a cold module cache)"
	GOBIN=$(BIN) $(GO) install $(MINIO_MODULE)@$(MINIO_VERSION)
	@rm -f $(BIN)/.minio-* && touch $@

$(BIN)/.csi-sanity-$(CSI_SANITY_VERSION):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) $(GO) install $(CSI_SANITY_MODULE)@$(CSI_SANITY_VERSION)
	@rm -f $(BIN)/.csi-sanity-* && touch $@

$(BIN)/.kustomize-$(KUSTOMIZE_VERSION):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) $(GO) install $(KUSTOMIZE_MODULE)@$(KUSTOMIZE_VERSION)
	@rm -f $(BIN)/.kustomize-* && touch $@

$(BIN)/.helm-$(HELM_VERSION):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) $(GO) install $(HELM_MODULE)@$(HELM_VERSION)
	@rm -f $(BIN)/.helm-* && touch $@

$(BIN)/.rclone-$(RCLONE_VERSION):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) $(GO) install $(RCLONE_MODULE)@$(RCLONE_VERSION)
	@rm -f $(BIN)/.rclone-* && touch $@

MANIFEST_TOOLS := $(BIN)/.kustomize-$(KUSTOMIZE_VERSION) $(BIN)/.helm-$(HELM_VERSION)

# The real node of make e2e. kube-apiserver, kubelet and etcd build from the
# wrapper modules in test/e2e/tools (their go.mod and go.sum pin every
# version; go install refuses the upstream modules for their replace lines).
# The suite runs the DaemonSet as users do, so the controller-manager and
# the scheduler run too; kubectl is not needed (the suite uses client-go).
# The version a wrapper's go.mod requires: `require M v` or a line of a block.
required = $(shell awk '$$1 == "$(1)" && $$2 ~ /^v/ { print $$2; exit } $$1 == "require" && $$2 == "$(1)" { print $$3; exit }' $(2))
KUBERNETES_VERSION := $(call required,k8s.io/kubernetes,test/e2e/tools/kubernetes/go.mod)
ETCD_VERSION       := $(call required,go.etcd.io/etcd/server/v3,test/e2e/tools/etcd/go.mod)
KUBE_LDFLAGS := -s -w -X k8s.io/component-base/version.gitVersion=$(KUBERNETES_VERSION) \
	-X k8s.io/component-base/version.gitMajor=1 \
	-X k8s.io/component-base/version.gitMinor=$(word 2,$(subst ., ,$(KUBERNETES_VERSION))) \
	-X k8s.io/component-base/version.gitTreeState=clean

$(BIN)/.kubernetes-$(KUBERNETES_VERSION): test/e2e/tools/kubernetes/go.mod test/e2e/tools/kubernetes/go.sum
	@mkdir -p $(BIN)
	@echo "building kube-apiserver, kube-controller-manager, kube-scheduler and kubelet $(KUBERNETES_VERSION) into bin/ (about 20 minutes on a cold build cache)"
	cd test/e2e/tools/kubernetes && CGO_ENABLED=0 $(GO) build -mod=readonly -trimpath -ldflags '$(KUBE_LDFLAGS)' \
		-o $(BIN)/ k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet
	@rm -f $(BIN)/.kubernetes-* && touch $@

$(BIN)/.etcd-$(ETCD_VERSION): test/e2e/tools/etcd/go.mod test/e2e/tools/etcd/go.sum
	@mkdir -p $(BIN)
	cd test/e2e/tools/etcd && CGO_ENABLED=0 $(GO) build -mod=readonly -trimpath -ldflags '-s -w' -o $(BIN)/etcd go.etcd.io/etcd/server/v3
	@rm -f $(BIN)/.etcd-* && touch $@

.PHONY: tools
tools: $(BIN)/.minio-$(MINIO_VERSION) $(BIN)/.csi-sanity-$(CSI_SANITY_VERSION) $(MANIFEST_TOOLS)

# --- tests -----------------------------------------------------------------

.PHONY: test
test: lint unit fuzz integration sanity fleet

# Each fuzz target runs for FUZZTIME on top of its committed seed corpus
# (pkg/source/testdata/fuzz), which `make unit` already replays.
FUZZTIME ?= 10s
FUZZ_TARGETS := FuzzParseURI FuzzBuildConfig FuzzValidateKey

.PHONY: fuzz
fuzz:
	@for f in $(FUZZ_TARGETS); do \
		echo "fuzzing $$f for $(FUZZTIME)"; \
		$(GO) test -run='^$$' -fuzz="^$$f$$" -fuzztime=$(FUZZTIME) ./pkg/source || exit 1; \
	done

.PHONY: lint
lint:
	@out="$$(gofmt -l cmd pkg test)"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

.PHONY: unit
unit: $(MANIFEST_TOOLS)
	$(GO) test -race -count=1 $(GOTEST_FLAGS) ./cmd/... ./pkg/... ./test/manifests/...

.PHONY: require-root
require-root:
	@if [ "$$(id -u)" != 0 ]; then echo "this target needs root: it makes real bind mounts (run it as root, e.g. sudo make $(MAKECMDGOALS))"; exit 1; fi

.PHONY: integration
integration: require-root $(BIN)/.minio-$(MINIO_VERSION) $(BIN)/.rclone-$(RCLONE_VERSION)
	$(GO) test -race -count=1 -timeout 30m $(GOTEST_FLAGS) ./test/integration/... ./test/benchrun/...
	@echo "smoke run of every Go benchmark (one iteration, -short); timings are not checked"
	$(GO) test -run '^$$' -bench . -benchtime 1x -short -count=1 ./test/bench/...

.PHONY: sanity
sanity: require-root tools
	$(GO) test -count=1 -timeout 20m -v ./test/sanity/... -args -skip='$(SANITY_SKIP)' -writer-specs='$(SANITY_WRITER_SPECS)'

# The CachedModel reconciler against a real etcd and kube-apiserver, as
# envtest runs them (no kubelet, no root), with deploy/kubernetes's CRD and
# RBAC. The Kubernetes binaries are the ones make e2e uses.
.PHONY: fleet
fleet: $(BIN)/.kubernetes-$(KUBERNETES_VERSION) $(BIN)/.etcd-$(ETCD_VERSION)
	$(GO) test -race -count=1 -timeout 10m $(GOTEST_FLAGS) ./test/fleet/...

# The real node's runtime comes from Debian's packages (bookworm: containerd
# 1.6.20, runc 1.1.5, CNI plugins 1.1.1, busybox for the test pods' image).
# A package counts as present only when dpkg says "install ok installed": a
# removed one keeps its config files and still answers dpkg -s.
E2E_PACKAGES := containerd runc containernetworking-plugins busybox-static

.PHONY: e2e-packages
e2e-packages: require-root
	@missing=""; for p in $(E2E_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

E2E_TOOLS := $(BIN)/.minio-$(MINIO_VERSION) $(MANIFEST_TOOLS) $(BIN)/.kubernetes-$(KUBERNETES_VERSION) $(BIN)/.etcd-$(ETCD_VERSION)

# test/e2e starts the cluster, builds the images from this tree, installs
# deploy/kubernetes and then the Helm chart, and stops everything it started.
.PHONY: e2e
e2e: require-root e2e-packages $(E2E_TOOLS)
	$(GO) test -count=1 -timeout 45m -v ./test/e2e/

# BENCH_FLAGS go to test/benchrun, e.g. BENCH_FLAGS=--with-4g or --runs=7.
BENCH_FLAGS ?=

.PHONY: bench
bench: require-root $(BIN)/.minio-$(MINIO_VERSION) $(BIN)/.rclone-$(RCLONE_VERSION) build
	$(GO) test -run '^$$' -bench . -benchtime 3x -timeout 60m ./test/bench/...
	$(GO) run ./test/benchrun --driver $(BIN)/modelcache-csi --rclone $(BIN)/rclone --out docs/benchmarks.md $(BENCH_FLAGS)

# --- demo ------------------------------------------------------------------

.PHONY: demo
demo: require-root $(BIN)/.minio-$(MINIO_VERSION) build
	$(GO) run ./test/demo --driver $(BIN)/modelcache-csi

.PHONY: clean
clean:
	rm -f $(BIN)/modelcache-csi $(BIN)/modelcachectl
