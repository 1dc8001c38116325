// Package integration holds the tests that run the real modelcache-csi
// binary as root against a real MinIO on loopback, with real bind mounts.
// `make test` installs MinIO and runs them; they fail, never skip, when
// root or MinIO is missing, so CI cannot pass without them.
package integration

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/test/testenv"
)

var (
	driverBin string
	minio     *testenv.MinIO
)

func TestMain(m *testing.M) {
	os.Exit(testenv.RunSuite(m, "integration tests", func(s *testenv.Suite) error {
		driverBin, minio = s.DriverBin, s.MinIO
		return nil
	}))
}

// env is one test's world: a proxy in front of the shared MinIO, a driver
// with its own cache and a directory standing in for kubelet's pods dir.
type env struct {
	t       *testing.T
	dir     string
	proxy   *testenv.Proxy
	driver  *testenv.Driver
	drivers []*testenv.Driver // every driver this test started, for the secrets check
	bucket  string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	p, err := testenv.StartProxy(minio.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	e := &env{t: t, dir: dir, proxy: p, bucket: bucketName(t.Name())}
	e.start()
	t.Cleanup(func() {
		if e.driver != nil {
			e.driver.Stop()
			if t.Failed() {
				t.Logf("driver logs:\n%s", e.driver.Logs())
			}
		}
		// The "secrets stay in memory" invariant, for every test: drivers run at -v=10 with the suite's
		// known credentials, and no log line may hold the secret key.
		for _, d := range e.drivers {
			if strings.Contains(d.Logs(), testenv.SecretKey) {
				t.Errorf("a driver log holds the secret access key")
			}
		}
		unmountAll(dir)
	})
	return e
}

// bucketName makes a valid, unique S3 bucket name from a test name: the
// hash keeps subtests apart after truncation.
func bucketName(test string) string {
	sum := sha256.Sum256([]byte(test))
	b := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, strings.ToLower(test))
	if len(b) > 40 {
		b = b[:40]
	}
	return strings.Trim(b, "-") + "-" + hex.EncodeToString(sum[:6])
}

func (e *env) start(args ...string) {
	e.t.Helper()
	d, err := testenv.StartDriver(driverBin, e.dir, filepath.Join(e.dir, "cache"), append([]string{"-v=10"}, args...)...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.driver = d
	e.drivers = append(e.drivers, d)
}

func (e *env) cacheDir() string { return filepath.Join(e.dir, "cache") }

func (e *env) target(name string) string {
	return filepath.Join(e.dir, "kubelet/pods", name, "volumes/kubernetes.io~csi/models/mount")
}

func (e *env) secret() map[string]string { return testenv.RcloneSecret("mys3", e.proxy.URL) }

func (e *env) upload(prefix string, files map[string][]byte) {
	e.t.Helper()
	if err := testenv.PutModel(context.Background(), testenv.Client(minio.Endpoint), e.bucket, prefix, files); err != nil {
		e.t.Fatal(err)
	}
}

// randomModel returns files of the given sizes with reproducible content.
func randomModel(seed byte, sizes map[string]int) map[string][]byte {
	r := rand.NewChaCha8([32]byte{seed})
	out := map[string][]byte{}
	for name, n := range sizes {
		b := make([]byte, n)
		_, _ = r.Read(b)
		out[name] = b
	}
	return out
}

func total(files map[string][]byte) int64 {
	var n int64
	for _, b := range files {
		n += int64(len(b))
	}
	return n
}

// digests returns path → sha256 of every file under dir.
func digests(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		sum := sha256.Sum256(b)
		out[rel] = hex.EncodeToString(sum[:])
		return nil
	})
	if err != nil {
		t.Fatalf("reading %s: %v", dir, err)
	}
	return out
}

func want(files map[string][]byte) map[string]string {
	out := map[string]string{}
	for name, b := range files {
		sum := sha256.Sum256(b)
		out[name] = hex.EncodeToString(sum[:])
	}
	return out
}

func sameFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	got, exp := digests(t, dir), want(files)
	if len(got) != len(exp) {
		t.Fatalf("%s holds %d files, want %d: %v", dir, len(got), len(exp), got)
	}
	for k, v := range exp {
		if got[k] != v {
			t.Fatalf("%s/%s has sha256 %q, want %q", dir, k, got[k], v)
		}
	}
}

// mountInfo returns the mount options of target from /proc/self/mountinfo,
// or "" when target is not a mount point.
func mountInfo(t *testing.T, target string) string {
	t.Helper()
	return mountInfoOf(t, "/proc/self/mountinfo", target)
}

// mountInfoOf returns the per-mount options of target in a mountinfo file,
// or "" when it is not a mount point there.
func mountInfoOf(t *testing.T, mountinfo, target string) string {
	t.Helper()
	b, err := os.ReadFile(mountinfo)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 5 && f[4] == target {
			return f[5]
		}
	}
	return ""
}

// unmountAll removes any mount a failed test left under dir.
func unmountAll(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var targets []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			targets = append(targets, f[4])
		}
	}
	for i := len(targets) - 1; i >= 0; i-- {
		_ = unmount(targets[i])
	}
}

// entries lists the names in a directory, empty when it does not exist.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var names []string
	for _, d := range des {
		names = append(names, d.Name())
	}
	return names
}
