package manifests

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/test/testenv"
)

// The image: a Go build stage and a slim Debian runtime with mount(8),
// both binaries built the way `make build` builds them, the driver as the
// entrypoint. The Dockerfile is read with a small line parser (continuations
// joined, comments dropped); no container engine is needed.

// instruction is one Dockerfile instruction, continuations joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, COPY...
	args string
}

// dockerStage is a FROM and the instructions after it.
type dockerStage struct {
	image, name string
	body        []instruction
}

func readDockerfile(t *testing.T) []dockerStage {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var logical []string
	var cur strings.Builder
	for _, line := range strings.Split(string(raw), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if body, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur.WriteString(body + " ")
			continue
		}
		cur.WriteString(trimmed)
		logical = append(logical, cur.String())
		cur.Reset()
	}
	var stages []dockerStage
	for _, l := range logical {
		cmd, args, _ := strings.Cut(l, " ")
		in := instruction{cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args)}
		if in.cmd == "FROM" {
			f := strings.Fields(in.args)
			s := dockerStage{image: f[len(f)-1]}
			for i, w := range f {
				if strings.HasPrefix(w, "--") {
					continue
				}
				s.image = w
				if i+2 < len(f) && strings.EqualFold(f[i+1], "AS") {
					s.name = f[i+2]
				}
				break
			}
			stages = append(stages, s)
			continue
		}
		if len(stages) == 0 {
			if in.cmd == "ARG" {
				continue
			}
			t.Fatalf("Dockerfile: %s before the first FROM", in.cmd)
		}
		stages[len(stages)-1].body = append(stages[len(stages)-1].body, in)
	}
	return stages
}

// goBuilds returns each `go build` command of a shell line, with the
// environment assignments written before it.
func goBuilds(run string) []string {
	var out []string
	for _, part := range regexp.MustCompile(`&&|;|\|\|`).Split(run, -1) {
		if strings.Contains(part, "go build") {
			out = append(out, strings.TrimSpace(part))
		}
	}
	return out
}

func TestDockerfile_BuildsBothBinariesLikeMakeIntoASlimRuntime(t *testing.T) {
	stages := readDockerfile(t)
	if len(stages) < 2 {
		t.Fatalf("Dockerfile has %d stages, want a build stage and a runtime stage", len(stages))
	}
	build, final := stages[0], stages[len(stages)-1]
	if !strings.HasPrefix(build.image, "golang:") || build.name != "build" {
		t.Errorf("first stage FROM %s AS %s, want golang:<version> AS build", build.image, build.name)
	}
	if !regexp.MustCompile(`^debian:[a-z0-9.]+-slim$`).MatchString(final.image) {
		t.Errorf("final stage FROM %s, want debian:<release>-slim", final.image)
	}

	// The Go of the image can build go.mod's language version.
	gomod, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(gomod); m != nil {
		tag := strings.TrimPrefix(build.image, "golang:")
		if !strings.HasPrefix(tag, string(m[1])) {
			t.Errorf("build stage %s, but go.mod asks for Go %s", build.image, m[1])
		}
	}

	// Both binaries, each with CGO off, -trimpath and the version ldflag.
	built := map[string]bool{}
	for _, in := range build.body {
		if in.cmd != "RUN" {
			continue
		}
		for _, b := range goBuilds(in.args) {
			for _, flag := range []string{"CGO_ENABLED=0", "-trimpath", "-X main.version="} {
				if !strings.Contains(b, flag) {
					t.Errorf("Dockerfile %q lacks %s", b, flag)
				}
			}
			for _, pkg := range []string{"./cmd/modelcache-csi", "./cmd/modelcachectl"} {
				if strings.HasSuffix(b, " "+pkg) || strings.Contains(b, " "+pkg+" ") {
					built[pkg] = true
				}
			}
		}
	}
	for _, pkg := range []string{"./cmd/modelcache-csi", "./cmd/modelcachectl"} {
		if !built[pkg] {
			t.Errorf("the build stage does not build %s", pkg)
		}
	}

	// The build stage copies every directory of this module the binaries
	// import (go list), so the image builds from a clean context.
	copied := map[string]bool{}
	for _, in := range build.body {
		if in.cmd == "COPY" && !strings.Contains(in.args, "--from") {
			f := strings.Fields(in.args)
			for _, src := range f[:len(f)-1] {
				copied[strings.TrimSuffix(filepath.Clean(src), "/")] = true
			}
		}
	}
	cmd := exec.Command("go", "list", "-deps", "-f", "{{if .Module}}{{if .Module.Main}}{{.Dir}}{{end}}{{end}}", "./cmd/modelcache-csi", "./cmd/modelcachectl")
	cmd.Dir = testenv.RepoRoot()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dir := range strings.Fields(string(out)) {
		rel, _ := filepath.Rel(testenv.RepoRoot(), dir)
		top := strings.Split(filepath.ToSlash(rel), "/")[0]
		if !copied[top] {
			t.Errorf("the binaries import %s, but the build stage does not COPY %s", rel, top)
		}
	}
	for _, f := range []string{"go.mod", "go.sum"} {
		if !copied[f] {
			t.Errorf("the build stage does not COPY %s", f)
		}
	}

	// The runtime: mount(8) for k8s.io/mount-utils, and no toolchain.
	var installed []string
	var entrypoint string
	for _, in := range final.body {
		switch in.cmd {
		case "RUN":
			for _, part := range regexp.MustCompile(`&&|;`).Split(in.args, -1) {
				f := strings.Fields(part)
				if i := slices.Index(f, "install"); i > 0 && (f[0] == "apt-get" || f[0] == "apt") {
					for _, w := range f[i+1:] {
						if !strings.HasPrefix(w, "-") {
							installed = append(installed, w)
						}
					}
					if !slices.Contains(f, "--no-install-recommends") {
						t.Errorf("runtime %q installs recommended packages too; add --no-install-recommends", strings.TrimSpace(part))
					}
				}
			}
		case "ENTRYPOINT":
			entrypoint = in.args
		}
	}
	if !slices.Contains(installed, "mount") {
		t.Errorf("the runtime installs %v, want mount (util-linux's mount and umount)", installed)
	}
	for _, p := range installed {
		if regexp.MustCompile(`^(gcc|g\+\+|cpp|clang|make|build-essential|golang|libc6-dev|binutils|git|curl|wget)([-:].*)?$`).MatchString(p) {
			t.Errorf("the runtime installs %s; it needs no toolchain or downloader", p)
		}
	}
	if entrypoint != `["/usr/local/bin/modelcache-csi"]` {
		t.Errorf("ENTRYPOINT %s, want [\"/usr/local/bin/modelcache-csi\"] in exec form (signals reach the driver)", entrypoint)
	}
	var copiedBins bool
	for _, in := range final.body {
		if in.cmd == "COPY" && strings.Contains(in.args, "--from=build") && strings.Contains(in.args, "modelcache-csi") &&
			strings.Contains(in.args, "modelcachectl") && strings.HasSuffix(in.args, "/usr/local/bin/") {
			copiedBins = true
		}
	}
	if !copiedBins {
		t.Error("the runtime does not COPY --from=build both binaries into /usr/local/bin/")
	}
}

// `make build` uses the flags the Dockerfile uses: -trimpath and the
// version stamped with -X main.version.
func TestMakefile_BuildUsesTheImagesFlags(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	for _, m := range regexp.MustCompile(`(?m)^([A-Z_]+)\s*:?=\s*(.*)$`).FindAllStringSubmatch(string(raw), -1) {
		vars[m[1]] = strings.TrimSpace(m[2])
	}
	if !strings.Contains(vars["LDFLAGS"], "-X main.version=$(VERSION)") {
		t.Errorf("Makefile LDFLAGS = %q, want -X main.version=$(VERSION)", vars["LDFLAGS"])
	}
	bf := vars["BUILDFLAGS"]
	if !strings.Contains(bf, "-trimpath") || !strings.Contains(bf, "-ldflags '$(LDFLAGS)'") {
		t.Errorf("Makefile BUILDFLAGS = %q, want -trimpath -ldflags '$(LDFLAGS)'", bf)
	}
	target := regexp.MustCompile(`(?ms)^build:\s*\n((?:\t[^\n]*\n)+)`).FindStringSubmatch(string(raw))
	if target == nil {
		t.Fatal("Makefile has no build target")
	}
	for _, pkg := range []string{"./cmd/modelcache-csi", "./cmd/modelcachectl"} {
		found := false
		for _, line := range strings.Split(target[1], "\n") {
			if strings.Contains(line, pkg) {
				found = true
				if !strings.Contains(line, "$(BUILDFLAGS)") || !strings.Contains(line, "CGO_ENABLED=0") {
					t.Errorf("make build: %q lacks CGO_ENABLED=0 or $(BUILDFLAGS)", strings.TrimSpace(line))
				}
			}
		}
		if !found {
			t.Errorf("make build does not build %s", pkg)
		}
	}
}
