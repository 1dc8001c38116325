# modelcache — build, test and demo.
#
#   make demo    the main job end to end on this machine (needs root)
#   make test    lint, unit, fuzz, integration (root, MinIO, real mounts),
#                csi-sanity, the CachedModel reconciler against a real
#                kube-apiserver and etcd (built into bin/ the first time),
#                and node plugins serving each other in network namespaces
#   make e2e     the DaemonSet on a real single-node Kubernetes (root; builds
#                kube-apiserver, kubelet and etcd into bin/ the first time)
#   make bench   benchmarks (never part of make test)
#
# Tools the tests need are built from Go modules at pinned versions into the
# git-ignored bin/. A stamp file per version rebuilds a tool when its pin
# changes and never otherwise.
#
# make test and make e2e time each phase (tool builds included) and print a
# table at the end, pass or fail; make times prints it again. make test runs
# its suites one after another and builds the tools beside them, each tool
# before the first suite that needs it (TEST_JOBS=1 builds them in turn).

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
# rclone library go.mod pins, so the comparison is fair, with the commands
# and backends the benchmarks use (test/rclonecli). It builds in this module
# with the driver's flags (CGO_ENABLED=0 -trimpath), so that a cold build
# compiles the packages the two share once: 30 of its own, where the whole
# CLI as its own module, with its own dependency versions, compiled 1,585.
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

# --- phase times -----------------------------------------------------------

# make test and make e2e pass TIMES to the makes they run; each phase then
# appends "NAME begin|end SECONDS" to it, and a failed make "NAME failed
# SECONDS" for each phase it left open. make test starts the file afresh
# and make e2e replaces only its own lines, so after .ci/run it holds both.
TIMES_FILE := $(CURDIR)/.phase-times
TIMES ?=
begin = $(if $(TIMES),@echo "$(1) begin $$(date +%s)" >> $(TIMES))
end   = $(if $(TIMES),@echo "$(1) end $$(date +%s)" >> $(TIMES))
close-failed = awk -v now="$$(date +%s)" '$$2 == "begin" { open[$$1] = 1 } $$2 != "begin" { delete open[$$1] } \
	END { for (p in open) print p, "failed", now }' $(TIMES_FILE) > $(TIMES_FILE).new && cat $(TIMES_FILE).new >> $(TIMES_FILE) && rm $(TIMES_FILE).new

# The table: when each phase started (minutes from the first) and how long
# it took. Phases overlap (tools build beside the suites), so the wall time
# is the last end minus the first begin, not the sum.
define TIMES_TABLE
function mmss(s) { return sprintf("%d:%02d", s / 60, s % 60) }
$$2 == "begin" { if (!($$1 in b)) order[n++] = $$1; b[$$1] = $$3; delete e[$$1]; if (first == "" || $$3 < first) first = $$3 }
$$2 == "end" || $$2 == "failed" { e[$$1] = $$3; failed[$$1] = $$2 == "failed"; if ($$3 > last) last = $$3 }
END {
	if (n == 0) exit
	printf "\n%-16s %7s %7s\n", "phase", "start", "took"
	for (i = 0; i < n; i++) {
		p = order[i]
		if (p in e) printf "%-16s %7s %7s%s\n", p, mmss(b[p] - first), mmss(e[p] - b[p]), failed[p] ? "  FAILED" : ""
		else { printf "%-16s %7s %7s  still running\n", p, mmss(b[p] - first), mmss(now - b[p]); last = now }
	}
	printf "%-16s %7s %7s\n\n", "wall", "", mmss(last - first)
}
endef
export TIMES_TABLE

.PHONY: times
times:
	@if [ -s $(TIMES_FILE) ]; then awk -v now="$$(date +%s)" "$$TIMES_TABLE" $(TIMES_FILE); else echo "no phase times: run make test or make e2e"; fi

.PHONY: help
help:
	@echo "make demo     cold then warm publish of a generated model from a loopback MinIO (root)"
	@echo "make test     lint, unit, integration, csi-sanity, fleet (apiserver) and nodes (peers) tests (root)"
	@echo "make e2e      the node plugin's image as a DaemonSet on a real single-node Kubernetes (root)"
	@echo "make bench    benchmarks"
	@echo "make build    bin/modelcache-csi and bin/modelcachectl"
	@echo "make tools    bin/minio, bin/csi-sanity, bin/kustomize and bin/helm at their pinned versions"
	@echo "make times    the phase times of the last make test and make e2e"

.PHONY: build
build:
	CGO_ENABLED=0 $(GO) build $(BUILDFLAGS) -o $(BIN)/modelcache-csi ./cmd/modelcache-csi
	CGO_ENABLED=0 $(GO) build $(BUILDFLAGS) -o $(BIN)/modelcachectl ./cmd/modelcachectl

# --- pinned tools ----------------------------------------------------------

$(BIN)/.minio-$(MINIO_VERSION):
	$(call begin,minio)
	@mkdir -p $(BIN)
	@echo "building MinIO $(MINIO_VERSION) into bin/ (several minutes on a cold module cache)"
	GOBIN=$(BIN) $(GO) install $(MINIO_MODULE)@$(MINIO_VERSION)
	@rm -f $(BIN)/.minio-* && touch $@
	$(call end,minio)

$(BIN)/.csi-sanity-$(CSI_SANITY_VERSION):
	$(call begin,csi-sanity)
	@mkdir -p $(BIN)
	GOBIN=$(BIN) $(GO) install $(CSI_SANITY_MODULE)@$(CSI_SANITY_VERSION)
	@rm -f $(BIN)/.csi-sanity-* && touch $@
	$(call end,csi-sanity)

$(BIN)/.kustomize-$(KUSTOMIZE_VERSION):
	$(call begin,kustomize)
	@mkdir -p $(BIN)
	GOBIN=$(BIN) $(GO) install $(KUSTOMIZE_MODULE)@$(KUSTOMIZE_VERSION)
	@rm -f $(BIN)/.kustomize-* && touch $@
	$(call end,kustomize)

$(BIN)/.helm-$(HELM_VERSION):
	$(call begin,helm)
	@mkdir -p $(BIN)
	GOBIN=$(BIN) $(GO) install $(HELM_MODULE)@$(HELM_VERSION)
	@rm -f $(BIN)/.helm-* && touch $@
	$(call end,helm)

$(BIN)/.rclone-$(RCLONE_VERSION):
	$(call begin,rclone)
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -mod=readonly -trimpath -o $(BIN)/rclone ./test/rclonecli
	@rm -f $(BIN)/.rclone-* && touch $@
	$(call end,rclone)

MANIFEST_TOOLS := $(BIN)/.kustomize-$(KUSTOMIZE_VERSION) $(BIN)/.helm-$(HELM_VERSION)

# The official JavaScript Hub client, from npm into bin/npm: test/hfclient
# runs it against pkg/source/hftest, the Hub stand-in the hf:// source is
# tested with, so that the stand-in answers as the Hub does. The stamp
# lives in bin/npm, so that removing the folder installs it again.
HF_HUB_VERSION := 2.17.5

$(BIN)/npm/.hfhub-$(HF_HUB_VERSION):
	$(call begin,hfhub)
	@mkdir -p $(BIN)/npm
	npm install --prefix $(BIN)/npm --save-exact --no-audit --no-fund --loglevel=error @huggingface/hub@$(HF_HUB_VERSION)
	@rm -f $(BIN)/npm/.hfhub-* && touch $@
	$(call end,hfhub)

.PHONY: hfhub
hfhub: $(BIN)/npm/.hfhub-$(HF_HUB_VERSION)

# The oras CLI, which test/benchrun's section 9 pulls oci:// models with
# against the driver: make bench builds it, make test never does.
ORAS_MODULE  := oras.land/oras/cmd/oras
ORAS_VERSION := v1.3.6

$(BIN)/.oras-$(ORAS_VERSION):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) $(GO) install $(ORAS_MODULE)@$(ORAS_VERSION)
	@rm -f $(BIN)/.oras-* && touch $@

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
	$(call begin,kubernetes)
	@mkdir -p $(BIN)
	@echo "building kube-apiserver, kube-controller-manager, kube-scheduler and kubelet $(KUBERNETES_VERSION) into bin/ (about 20 minutes on a cold build cache)"
	cd test/e2e/tools/kubernetes && CGO_ENABLED=0 $(GO) build -mod=readonly -trimpath -ldflags '$(KUBE_LDFLAGS)' \
		-o $(BIN)/ k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet
	@rm -f $(BIN)/.kubernetes-* && touch $@
	$(call end,kubernetes)

$(BIN)/.etcd-$(ETCD_VERSION): test/e2e/tools/etcd/go.mod test/e2e/tools/etcd/go.sum
	$(call begin,etcd)
	@mkdir -p $(BIN)
	cd test/e2e/tools/etcd && CGO_ENABLED=0 $(GO) build -mod=readonly -trimpath -ldflags '-s -w' -o $(BIN)/etcd go.etcd.io/etcd/server/v3
	@rm -f $(BIN)/.etcd-* && touch $@
	$(call end,etcd)

.PHONY: tools
tools: $(BIN)/.minio-$(MINIO_VERSION) $(BIN)/.csi-sanity-$(CSI_SANITY_VERSION) $(MANIFEST_TOOLS)

# --- tests -----------------------------------------------------------------

# make test runs its suites one after another: on two cores two suites only
# slow each other, and the timing-sensitive tests among them flake. Beside
# them, in a second make job, the tools build, each before the first suite
# that needs it (kustomize, the Hub client and helm for unit, MinIO and
# rclone for integration, csi-sanity, then Kubernetes and etcd for fleet), and then
# what make e2e compiles, so that a cold .ci/run builds nothing twice and
# keeps both cores busy while the suites wait on sockets and mounts.
TEST_PHASES := lint unit fuzz integration sanity fleet nodes
TEST_JOBS   ?= 2

.PHONY: test
test:
	@rm -f $(TIMES_FILE)
	@rc=0; $(MAKE) --no-print-directory -j$(TEST_JOBS) TIMES=$(TIMES_FILE) IN_TURN=1 test-phases || rc=$$?; \
		if [ $$rc != 0 ]; then $(close-failed); fi; $(MAKE) --no-print-directory times; exit $$rc

.PHONY: test-phases
test-phases: $(TEST_PHASES) e2e-build

# IN_TURN chains the two jobs with order-only prerequisites (make alone
# would start whatever is ready first, tools ahead of suites).
ifeq ($(IN_TURN),1)
unit: | lint
fuzz: | unit
integration: | fuzz
sanity: | integration
fleet: | sanity
nodes: | fleet
$(BIN)/npm/.hfhub-$(HF_HUB_VERSION): | $(BIN)/.kustomize-$(KUSTOMIZE_VERSION)
$(BIN)/.helm-$(HELM_VERSION): | $(BIN)/npm/.hfhub-$(HF_HUB_VERSION)
$(BIN)/.minio-$(MINIO_VERSION): | $(BIN)/.helm-$(HELM_VERSION)
$(BIN)/.rclone-$(RCLONE_VERSION): | $(BIN)/.minio-$(MINIO_VERSION)
$(BIN)/.csi-sanity-$(CSI_SANITY_VERSION): | $(BIN)/.rclone-$(RCLONE_VERSION)
$(BIN)/.kubernetes-$(KUBERNETES_VERSION): | $(BIN)/.csi-sanity-$(CSI_SANITY_VERSION)
$(BIN)/.etcd-$(ETCD_VERSION): | $(BIN)/.kubernetes-$(KUBERNETES_VERSION)
e2e-build: | $(BIN)/.etcd-$(ETCD_VERSION)
endif

# Each fuzz target runs for FUZZTIME on top of its committed seed corpus
# (pkg/source/remotespec/testdata/fuzz), which `make unit` already replays.
# The targets live in pkg/source/remotespec, which links no backend: fuzzing
# instruments every package the test links, and pkg/source's backends made
# that a second build of rclone and the cloud SDKs (9 minutes of a cold run).
FUZZTIME ?= 10s
FUZZ_TARGETS := FuzzParseURI FuzzBuildConfig FuzzValidateKey

.PHONY: fuzz
fuzz:
	$(call begin,fuzz)
	@for f in $(FUZZ_TARGETS); do \
		echo "fuzzing $$f for $(FUZZTIME)"; \
		$(GO) test -run='^$$' -fuzz="^$$f$$" -fuzztime=$(FUZZTIME) ./pkg/source/remotespec || exit 1; \
	done
	$(call end,fuzz)

# vet with -race: it compiles every package's dependencies, and with the
# race tests' flags those compilations are the ones unit, sanity and fleet
# then take from the build cache; without -race they were a second copy of
# the whole graph that only the non-race builds (integration's and e2e's
# harnesses, the rclone CLI) shared part of. No file of this module is
# built differently under -race.
.PHONY: lint
lint:
	$(call begin,lint)
	@out="$$(gofmt -l cmd pkg test)"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet -race ./...
	$(call end,lint)

.PHONY: unit
unit: $(MANIFEST_TOOLS) $(BIN)/npm/.hfhub-$(HF_HUB_VERSION)
	$(call begin,unit)
	$(GO) test -race -count=1 $(GOTEST_FLAGS) ./cmd/... ./pkg/... ./test/manifests/... ./test/testenv/... ./test/hfclient/...
	$(call end,unit)

.PHONY: require-root
require-root:
	@if [ "$$(id -u)" != 0 ]; then echo "this target needs root: it makes real bind mounts (run it as root, e.g. sudo make $(MAKECMDGOALS))"; exit 1; fi

# The suites that drive the real modelcache-csi process build it with
# -race (testenv.BuildDriver reads MODELCACHE_DRIVER_BUILDFLAGS) and fail
# when it reports a data race: the race detector of a test binary sees only
# the harness. integration's harness runs without -race: it only uploads,
# proxies and compares, and under -race it cost a third more CPU than the
# driver's -race does (20,000 uploads in TestBounds took twice as long).
DRIVER_RACE := MODELCACHE_DRIVER_BUILDFLAGS=-race

# The harnesses that run without -race (integration, bench smoke runs, e2e)
# build as the driver's images and the rclone CLI do: static, -trimpath.
# They link most of what the driver links, and built any other way that
# was a third compilation of its 1,200 packages (beside -race's and the
# images'); testenv.RepoRoot finds the repository from the working
# directory for it.
HARNESS       := CGO_ENABLED=0
HARNESS_FLAGS := -trimpath

.PHONY: integration
integration: require-root $(BIN)/.minio-$(MINIO_VERSION) $(BIN)/.rclone-$(RCLONE_VERSION)
	$(call begin,integration)
	$(DRIVER_RACE) $(HARNESS) $(GO) test $(HARNESS_FLAGS) -count=1 -timeout 30m -skip '^TestBenchrunFleetSmoke$$' $(GOTEST_FLAGS) ./test/integration/... ./test/benchrun/...
	@echo "smoke run of every Go benchmark (one iteration, -short); timings are not checked"
	$(DRIVER_RACE) $(HARNESS) $(GO) test $(HARNESS_FLAGS) -run '^$$' -bench . -benchtime 1x -short -count=1 ./test/bench/...
	$(call end,integration)

.PHONY: sanity
sanity: require-root $(BIN)/.minio-$(MINIO_VERSION) $(BIN)/.csi-sanity-$(CSI_SANITY_VERSION)
	$(call begin,sanity)
	$(DRIVER_RACE) $(GO) test -race -count=1 -timeout 20m -v ./test/sanity/... -args -skip='$(SANITY_SKIP)' -writer-specs='$(SANITY_WRITER_SPECS)'
	$(call end,sanity)

# The CachedModel reconciler against a real etcd and kube-apiserver, as
# envtest runs them (no kubelet, no root), with deploy/kubernetes's CRD and
# RBAC. The Kubernetes binaries are the ones make e2e uses.
.PHONY: fleet
fleet: $(BIN)/.kubernetes-$(KUBERNETES_VERSION) $(BIN)/.etcd-$(ETCD_VERSION)
	$(call begin,fleet)
	$(GO) test -race -count=1 -timeout 10m $(GOTEST_FLAGS) ./test/fleet/...
	$(call end,fleet)

# Node plugins serving each other (docs/design.md "Peers"): several real
# plugins, built -race, each in its own network namespace, against a real
# etcd and kube-apiserver and MinIO behind a capped origin proxy
# (test/testenv/nodes). Root for the namespaces and the mounts.
.PHONY: nodes
nodes: require-root $(BIN)/.minio-$(MINIO_VERSION) $(BIN)/.kubernetes-$(KUBERNETES_VERSION) $(BIN)/.etcd-$(ETCD_VERSION)
	$(call begin,nodes)
	$(DRIVER_RACE) $(HARNESS) $(GO) test $(HARNESS_FLAGS) -count=1 -timeout 20m -v $(GOTEST_FLAGS) ./test/nodes/...
	@echo "smoke run of make bench's fleet section (test/benchrun), which needs the same binaries"
	$(DRIVER_RACE) $(HARNESS) $(GO) test $(HARNESS_FLAGS) -count=1 -timeout 10m -run '^TestBenchrunFleetSmoke$$' ./test/benchrun/
	$(call end,nodes)

# The real node's runtime comes from Debian's packages (bookworm: containerd
# 1.6.20, runc 1.1.5, CNI plugins 1.1.1, busybox for the test pods' image).
# A package counts as present only when dpkg says "install ok installed": a
# removed one keeps its config files and still answers dpkg -s.
E2E_PACKAGES := containerd runc containernetworking-plugins busybox-static

.PHONY: e2e-packages
e2e-packages: require-root
	$(call begin,e2e-packages)
	@missing=""; for p in $(E2E_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(call end,e2e-packages)

E2E_TOOLS := $(BIN)/.minio-$(MINIO_VERSION) $(MANIFEST_TOOLS) $(BIN)/.kubernetes-$(KUBERNETES_VERSION) $(BIN)/.etcd-$(ETCD_VERSION)

# What make e2e compiles, into the build cache only: its test binary (the
# harness, without -race: it builds the images in Go) and the binaries of
# the images, with the flags test/e2e builds them with (static, -trimpath;
# -ldflags only change the link). make test runs it beside its suites.
.PHONY: e2e-build
e2e-build:
	$(call begin,e2e-build)
	$(HARNESS) $(GO) test $(HARNESS_FLAGS) -c -o /dev/null ./test/e2e/
	CGO_ENABLED=0 $(GO) build -trimpath -o /dev/null ./cmd/modelcache-csi ./cmd/modelcachectl ./test/e2e/standins/...
	$(call end,e2e-build)

# test/e2e starts the cluster, builds the images from this tree, installs
# deploy/kubernetes and then the Helm chart, and stops everything it started.
# make e2e replaces its own lines of the phase times and prints them with
# those of the last make test.
.PHONY: e2e
e2e:
	@touch $(TIMES_FILE) && sed -i -E '/^e2e(-packages)? /d' $(TIMES_FILE)
	@rc=0; $(MAKE) --no-print-directory -j$(TEST_JOBS) TIMES=$(TIMES_FILE) e2e-phases || rc=$$?; \
		if [ $$rc != 0 ]; then $(close-failed); fi; $(MAKE) --no-print-directory times; exit $$rc

.PHONY: e2e-phases
e2e-phases: require-root e2e-packages $(E2E_TOOLS)
	$(call begin,e2e)
	$(HARNESS) $(GO) test $(HARNESS_FLAGS) -count=1 -timeout 45m -v ./test/e2e/
	$(call end,e2e)

# BENCH_FLAGS go to test/benchrun, e.g. BENCH_FLAGS=--with-4g or --runs=7.
BENCH_FLAGS ?=

.PHONY: bench
bench: require-root $(BIN)/.minio-$(MINIO_VERSION) $(BIN)/.rclone-$(RCLONE_VERSION) $(BIN)/.kubernetes-$(KUBERNETES_VERSION) $(BIN)/.etcd-$(ETCD_VERSION) $(BIN)/.oras-$(ORAS_VERSION) $(BIN)/.hfhub-$(HF_HUB_VERSION) build
	$(GO) test -run '^$$' -bench . -benchtime 3x -timeout 60m ./test/bench/...
	$(GO) run ./test/benchrun --driver $(BIN)/modelcache-csi --rclone $(BIN)/rclone --oras $(BIN)/oras --npm $(BIN)/npm --out docs/benchmarks.md $(BENCH_FLAGS)

# --- demo ------------------------------------------------------------------

.PHONY: demo
demo: require-root $(BIN)/.minio-$(MINIO_VERSION) build
	$(GO) run ./test/demo --driver $(BIN)/modelcache-csi

.PHONY: clean
clean:
	rm -f $(BIN)/modelcache-csi $(BIN)/modelcachectl
