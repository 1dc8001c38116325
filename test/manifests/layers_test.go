package manifests

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/test/testenv"
)

// module is this repository's module path.
const module = "github.com/modelcache/modelcache/"

// nodeOnly are what only the node plugin's data path needs: the downloader
// (rclone and its backends), the state database (bbolt) and the packages
// built on them.
var nodeOnly = []string{
	"github.com/rclone/", "go.etcd.io/bbolt",
	module + "pkg/csi", module + "pkg/cache", module + "pkg/store", module + "pkg/state", module + "pkg/source",
}

// TestLayers_PackagesLinkOnlyWhatTheirJobNeeds keeps the arrows
// docs/design.md "Packages" draws, which nothing else checks: a package that
// needs only a name or a wire type links neither the downloader nor the
// database, and a lower layer's test helper imports no higher layer.
func TestLayers_PackagesLinkOnlyWhatTheirJobNeeds(t *testing.T) {
	for _, tc := range []struct {
		pkg string
		// forbidden are import path prefixes pkg must not link.
		forbidden []string
		// allowed, when set, are the only prefixes outside the standard
		// library that pkg may link.
		allowed []string
	}{
		{pkg: "./pkg/fleet", forbidden: nodeOnly},
		// The peer endpoint serves the store through two small interfaces
		// (Blobs, Objects), so that the store and the cache can use its
		// client without an import cycle.
		{pkg: "./pkg/peer", forbidden: nodeOnly},
		// The in-memory remote is the source layer's: the layers above
		// build on it, not it on them.
		{pkg: "./pkg/source/sourcetest", forbidden: []string{
			module + "pkg/store", module + "pkg/state", module + "pkg/cache", module + "pkg/csi", module + "pkg/admin",
		}},
		{pkg: "./pkg/names", allowed: []string{module + "pkg/names"}},
		{pkg: "./pkg/adminapi", allowed: []string{module + "pkg/adminapi"}},
		{pkg: "./cmd/modelcachectl", forbidden: nodeOnly, allowed: []string{
			module + "cmd/modelcachectl", module + "pkg/adminapi", module + "pkg/units",
			"golang.org/x/term", "golang.org/x/sys/", "sigs.k8s.io/yaml", "go.yaml.in/yaml/",
		}},
	} {
		t.Run(strings.TrimPrefix(tc.pkg, "./"), func(t *testing.T) {
			var forbidden, unexpected []string
			for _, d := range nonStandardDeps(t, tc.pkg) {
				if hasAnyPrefix(d, tc.forbidden) {
					forbidden = append(forbidden, d)
				} else if tc.allowed != nil && !hasAnyPrefix(d, tc.allowed) {
					unexpected = append(unexpected, d)
				}
			}
			if len(forbidden) > 0 {
				t.Errorf("%s links %d packages it must not (go list -deps %s), e.g. %s", tc.pkg, len(forbidden), tc.pkg, strings.Join(forbidden[:min(len(forbidden), 5)], ", "))
			}
			if len(unexpected) > 0 {
				t.Errorf("%s links %s, outside %s", tc.pkg, strings.Join(unexpected, ", "), strings.Join(tc.allowed, ", "))
			}
		})
	}
}

// nonStandardDeps lists what pkg links from outside the standard library,
// itself included.
func nonStandardDeps(t *testing.T, pkg string) []string {
	t.Helper()
	cmd := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", pkg)
	cmd.Dir = testenv.RepoRoot()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	deps := strings.Fields(string(out))
	if len(deps) == 0 {
		t.Fatalf("go list -deps %s listed nothing", pkg)
	}
	return deps
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}
