// Package nodes_test runs several real node plugins that serve each other
// (issue 23, docs/design.md "Peers"): each in its own network namespace,
// against a real etcd and kube-apiserver and a real MinIO behind a proxy
// that caps and counts the origin's egress (test/testenv/nodes). It needs
// root; `make test` runs it (make nodes), with the plugins built -race.
// Its assertions are on bytes and outcomes, never on wall time.
package nodes_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/e2e/cluster"
	"github.com/modelcache/modelcache/test/testenv"
	"github.com/modelcache/modelcache/test/testenv/nodes"
	"k8s.io/client-go/rest"
)

// suite is what every test shares: the driver, MinIO with the models, and
// the control plane.
var suite struct {
	driver string
	minio  *testenv.MinIO
	admin  *rest.Config
}

// A model the tests publish: its files' sha256 by path.
type model struct {
	uri   string
	files map[string]string
	size  int64
}

var (
	// big is 1 GiB in one file uploaded in parts as minio-go uploads
	// (a multipart ETag), and a small config.
	big = &model{uri: "mys3:models/big"}
	// small is smaller (still above the ranged cutoff) for the tests
	// that do not need the big one.
	small = &model{uri: "mys3:models/small"}
)

const bucket = "models"

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "test/nodes needs root (network namespaces, bind mounts): run it through make as root")
		return 1
	}
	dir, err := os.MkdirTemp("", "modelcache-nodes-suite-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	start := time.Now()
	if suite.driver, err = testenv.BuildDriver(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if suite.minio, err = testenv.StartMinIO(filepath.Join(dir, "minio")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer suite.minio.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin := filepath.Join(testenv.RepoRoot(), "bin")
	cp, err := cluster.StartControlPlane(ctx, cluster.ControlPlaneConfig{Bin: bin, Work: filepath.Join(dir, "controlplane")})
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting etcd and kube-apiserver: %v\n", err)
		return 1
	}
	defer cp.Stop()
	suite.admin = rest.CopyConfig(cp.Rest)
	suite.admin.QPS, suite.admin.Burst = 100, 200
	if err := uploadModels(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("driver built, MinIO, etcd and kube-apiserver up, models uploaded in %s\n", time.Since(start).Round(100*time.Millisecond))
	code := m.Run()
	if races := testenv.RaceReports(); races != "" {
		fmt.Fprintf(os.Stderr, "a node plugin reported data races:\n%s", races)
		return 1
	}
	return code
}

// uploadModels puts the tests' models into MinIO.
func uploadModels(ctx context.Context) error {
	if err := testenv.PutModel(ctx, testenv.Client(suite.minio.Endpoint), bucket, "", nil); err != nil {
		return err
	}
	for _, u := range []struct {
		m     *model
		sizes map[string]int
	}{
		{big, map[string]int{"weights.bin": 1 << 30, "config.json": 2 << 10}},
		{small, map[string]int{"weights.bin": 300 << 20, "tokenizer.json": 700 << 10}},
	} {
		u.m.files = map[string]string{}
		prefix := strings.TrimPrefix(u.m.uri, "mys3:"+bucket+"/")
		for name, size := range u.sizes {
			data := make([]byte, size)
			rng := rand.NewChaCha8([32]byte{byte(size), byte(len(name))})
			_, _ = rng.Read(data)
			sum := sha256.Sum256(data)
			u.m.files[name] = hex.EncodeToString(sum[:])
			u.m.size += int64(size)
			up := testenv.UploadParts.WithPartSize(16 << 20)
			if size < 5<<20 {
				up = testenv.UploadOnePut
			}
			if err := up.Put(ctx, suite.minio.Endpoint, bucket, prefix+"/"+name, data); err != nil {
				return err
			}
		}
	}
	return nil
}

// Origin caps: one stream as an object store's, and the origin's total
// egress, which all nodes share.
const (
	streamCap = 40 << 20
	totalCap  = 160 << 20
)

// startFleet starts n plugins, with --peers or without, stopped when the
// test ends; their logs are printed when it failed.
func startFleet(t *testing.T, n int, peers bool, args ...string) *nodes.Fleet {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f, err := nodes.Start(ctx, nodes.Config{Nodes: n, DriverBin: suite.driver, Admin: suite.admin,
		Origin: suite.minio.Endpoint, Peers: peers, Args: args})
	if err != nil {
		t.Fatalf("starting %d node plugins: %v", n, err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range f.Nodes {
				t.Logf("log of %s:\n%s", n.Name, tail(n.Logs(), 60))
			}
		}
		f.Close()
	})
	f.Origin.RateBytesPerSec.Store(streamCap)
	f.Origin.TotalBytesPerSec.Store(totalCap)
	return f
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	return strings.Join(l[max(0, len(l)-lines):], "\n")
}

// secret is the node-publish secret of the tests' remote, through the
// fleet's origin proxy.
func secret(f *nodes.Fleet) map[string]string {
	return testenv.RcloneSecret("mys3", f.Origin.URL)
}

// publishAll publishes m as volume id on every node at once.
func publishAll(t *testing.T, f *nodes.Fleet, ns []*nodes.Node, id string, m *model) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	errs := make([]error, len(ns))
	var wg sync.WaitGroup
	for i, n := range ns {
		wg.Go(func() { _, errs[i] = n.Publish(ctx, id, m.uri, secret(f)) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("publishing on %s: %v", ns[i].Name, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// checkFiles fails t unless the volume on node n holds exactly m's files.
func checkFiles(t *testing.T, n *nodes.Node, id string, m *model) {
	t.Helper()
	got, err := nodes.HashFiles(n.Target(id))
	if err != nil {
		t.Fatalf("reading %s's volume: %v", n.Name, err)
	}
	if len(got) != len(m.files) {
		t.Errorf("%s: %d files, want %d", n.Name, len(got), len(m.files))
	}
	for name, want := range m.files {
		if got[name] != want {
			t.Errorf("%s: %s has sha256 %.12s, want %.12s", n.Name, name, got[name], want)
		}
	}
}

// mib formats bytes for the figures the tests log.
func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
