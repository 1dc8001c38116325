package main

// Integration tier: runs the whole benchmark once in smoke mode against a
// real MinIO, the real driver binary, real bind mounts and the rclone CLI.
// It checks that every section produces numbers; it never asserts on a
// timing.

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
)

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func TestBenchrunSmokeIntegration(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the benchrun smoke test needs root (the driver makes real bind mounts): run it through `make integration` as root")
	}
	rclone, err := testenv.Binary("rclone")
	if err != nil {
		t.Fatalf("%v (the Makefile's rclone target builds it at go.mod's version)", err)
	}
	if _, err := testenv.Binary("minio"); err != nil {
		t.Fatal(err)
	}
	driver, err := testenv.BuildDriver(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}

	o := smokeOptions()
	o.Driver, o.Rclone, o.Log = driver, rclone, testLog{t}
	// Section 10 needs kube-apiserver and etcd, which make test builds
	// for a later phase: TestBenchrunFleetSmoke runs it there.
	o.Only = slices.DeleteFunc(slices.Clone(sectionNames), func(s string) bool { return s == secFleet })
	// Section 9's hf:// client is the one make unit installs; its oci://
	// models are published but not pulled with oras, which only make
	// bench builds.
	o.NpmDir = filepath.Join(testenv.RepoRoot(), "bin", "npm")
	rep, err := run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}

	if len(rep.Cold) != 1 {
		t.Fatalf("cold section has %d rows, want 1", len(rep.Cold))
	}
	c := rep.Cold[0]
	if len(c.Rclone) != 1 || len(c.Cache) != 1 || c.Rclone[0] <= 0 || c.Cache[0] <= 0 || c.CacheRSS.Max() <= 0 || c.RcloneRSS.Max() <= 0 {
		t.Errorf("cold section lacks numbers: %+v", c)
	}
	if len(rep.Warm) != 2 {
		t.Fatalf("warm section has %d rows, want the 1 MiB model and the small-files model", len(rep.Warm))
	}
	for _, w := range rep.Warm {
		if w.PerRun != o.WarmPublishes || len(w.P50) != 1 || w.P50[0] <= 0 || w.P99[0] <= 0 {
			t.Errorf("warm row for %s lacks numbers: %+v", w.Model.Name, w)
		}
	}
	if rep.Warm[1].Model.Files != o.ManyFiles {
		t.Errorf("small-files model has %d files, want %d", rep.Warm[1].Model.Files, o.ManyFiles)
	}
	if len(rep.Pods.Rows) != 4 || rep.Pods.N != o.Pods {
		t.Fatalf("second-pod section: %+v", rep.Pods)
	}
	for _, row := range rep.Pods.Rows {
		if len(row.Total) != 1 || row.Total[0] <= 0 || row.Bytes[0] <= 0 {
			t.Errorf("second-pod row %s %s lacks numbers: %+v", row.Way, mode(row.Concurrent), row)
		}
		// Not a timing: the "one download per key" invariant, one download per content key.
		if row.Way == "cache" && row.Bytes[0] != float64(rep.Pods.Model.Bytes) {
			t.Errorf("the cache fetched %.0f bytes for %d pods (%s); the model is %d bytes", row.Bytes[0], o.Pods, mode(row.Concurrent), rep.Pods.Model.Bytes)
		}
	}
	if rep.Throughput.Write.Max() <= 0 || rep.Throughput.ReadMBs.Max() <= 0 {
		t.Errorf("throughput section lacks numbers: %+v", rep.Throughput)
	}
	if len(rep.Memory) != 2 {
		t.Fatalf("memory section has %d rows, want 2", len(rep.Memory))
	}
	for _, m := range rep.Memory {
		if m.Peak.Max() <= 0 || m.AtStart.Max() <= 0 {
			t.Errorf("memory row for %s lacks numbers: %+v", m.Model.Name, m)
		}
	}
	s := rep.Restart
	if s.Trees != o.RestartTrees || s.LiveMounts != o.RestartRefs || len(s.Full) != 1 || s.Full[0] <= 0 || s.Empty[0] <= 0 {
		t.Errorf("restart section: %+v", s)
	}

	checkRemote(t, rep.Remote, o.Remote)
	checkScale(t, rep.Scale, o.Scale, o.Runs)
	checkSources(t, rep.Sources, o.Remote)

	md := rep.Markdown()
	for _, h := range []string{"## Machine", "## Goals", "## 1. ", "## 2. ", "## 3. ", "## 4. ", "## 5. ", "## 6. ", "## 7. ", "## 8. ", "## 9. ", "## Method"} {
		if !strings.Contains(md, h) {
			t.Errorf("report lacks %q", h)
		}
	}
	out := filepath.Join(t.TempDir(), "benchmarks.md")
	if err := os.WriteFile(out, []byte(md), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("report:\n%s", md)
}

// checkRemote checks that section 7 produced every figure, and the facts
// that show its plumbing works: the proxy throttled, the second publish
// carried pullPolicy Always (it fetched the new config.json), and the kill
// landed half way through the download.
func checkRemote(t *testing.T, x RemoteResult, o remoteOptions) {
	t.Helper()
	if len(x.Rows) != 4 {
		t.Fatalf("section 7 has %d side-by-side rows, want the one file, the shards, the small files and the file in parts", len(x.Rows))
	}
	for _, row := range x.Rows {
		if len(row.Rclone) != 1 || len(row.Cache) != 1 || row.Rclone[0] <= 0 || row.Cache[0] <= 0 || row.Goal <= 0 {
			t.Errorf("section 7 row for %s lacks numbers: %+v", row.Model.Name, row)
		}
	}
	// Not a timing but a floor no machine beats: the one file in at most 4
	// capped streams (either side's default) takes at least this long, so
	// a faster copy or publish did not go through the throttled proxy.
	one := x.Rows[0]
	floor := time.Duration(float64(one.Model.Size) / float64(4*o.Rate) * float64(time.Second))
	if o.Rate > 0 && (one.Cache[0] < floor || one.Rclone[0] < floor) {
		t.Errorf("the %s took rclone %s and the cache %s, under the %s that 4 streams of %d B/s need: a side did not go through the proxy", one.Model.Name, one.Rclone[0], one.Cache[0], floor, o.Rate)
	}
	for _, in := range []IncrResult{x.Incr, x.IncrParts} {
		if len(in.Bytes) != 1 || in.Bytes[0] < configBytes || in.Gets[0] < 1 || in.Again[0] <= 0 || in.Cold[0] <= 0 {
			t.Errorf("incremental update of %s: %+v; the publish with pullPolicy Always must fetch at least the new %d-byte config.json", in.Model.Name, in, configBytes)
		}
	}
	for _, rs := range []ResumeResult{x.Resume, x.ResumeParts} {
		if len(rs.After) != 1 || rs.Killed[0] < 50 || rs.Killed[0] >= 100 || rs.After[0] <= 0 || rs.Took[0] <= 0 {
			t.Errorf("resume of %s: %+v; the kill must land from half way to before the end, and the restarted publish fetch the rest", rs.Model.Name, rs)
		}
	}
}

// checkSources checks that section 9 produced every figure: both sources'
// rows (the hf:// client's times too; no oras pull in a smoke run), each
// publish through the throttled proxies, and the fine-tunes fetching at
// least their own config.json but not the weights the base brought.
func checkSources(t *testing.T, x SourcesResult, o remoteOptions) {
	t.Helper()
	if len(x.Rows) != 4 || len(x.FineTunes) != 2 {
		t.Fatalf("section 9 has %d rows and %d fine-tunes, want the file and the shards, and a fine-tune, of each source", len(x.Rows), len(x.FineTunes))
	}
	for _, row := range x.Rows {
		if len(row.Cache) != 1 || row.Cache[0] <= 0 {
			t.Errorf("section 9 row %s %s has no cold publish: %+v", row.Scheme, row.Model.Name, row)
		}
		if want := map[string]int{"hf://": 1, "oci://": 0}[row.Scheme]; len(row.Client) != want || want == 1 && row.Client[0] <= 0 {
			t.Errorf("section 9 row %s %s has %d client runs, want %d: %+v", row.Scheme, row.Model.Name, len(row.Client), want, row)
		}
		// Not a timing but a floor: the one file in at most 16 capped
		// streams takes at least this long.
		floor := time.Duration(float64(row.Model.Size) / float64(16*o.Rate) * float64(time.Second))
		if o.Rate > 0 && len(row.Cache) == 1 && row.Cache[0] < floor {
			t.Errorf("the cold publish of %s %s took %s, under the %s that 16 streams of %d B/s need: it did not go through the proxy", row.Scheme, row.Model.Name, row.Cache[0], floor, o.Rate)
		}
	}
	for _, ft := range x.FineTunes {
		if len(ft.Bytes) != 1 || ft.Bytes[0] < configBytes || ft.Bytes[0] >= float64(ft.Model.Size) || ft.Took[0] <= 0 || ft.Requests[0] < 1 {
			t.Errorf("%s fine-tune: %+v; its publish must fetch its %d-byte config.json and not the %d bytes of weights its base brought", ft.Scheme, ft, configBytes, ft.Model.Size)
		}
	}
	if x.HubClient == "" || x.Oras != "" {
		t.Errorf("section 9 names the Hub client %q and the oras CLI %q; want the first only", x.HubClient, x.Oras)
	}
}

// TestBenchrunFleetSmoke runs section 10 small (make nodes runs it, with
// the Kubernetes binaries it needs): every node ends with the model's
// bytes and the report has the section and its goals.
func TestBenchrunFleetSmoke(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the fleet smoke test needs root (network namespaces, bind mounts): run it through `make nodes` as root")
	}
	for _, b := range []string{"minio", "kube-apiserver", "etcd"} {
		if _, err := testenv.Binary(b); err != nil {
			t.Fatal(err)
		}
	}
	rclone, err := testenv.Binary("rclone") // the machine section names its version
	if err != nil {
		t.Fatal(err)
	}
	driver, err := testenv.BuildDriver(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	o := smokeOptions()
	o.Driver, o.Rclone, o.Log, o.Only = driver, rclone, testLog{t}, []string{secFleet}
	rep, err := run(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	s := rep.Fleet
	for _, fr := range []FleetRun{s.One, s.All, s.Off} {
		if len(fr.Took) != o.Fleet.Runs || fr.Took[0] <= 0 || fr.Origin[0] < float64(s.Model.Bytes) && !fr.Peers {
			t.Errorf("fleet run of %d nodes (peers %v) lacks figures: %+v", fr.Nodes, fr.Peers, fr)
		}
	}
	// Not timings: peers off, every node fetched the model from the origin.
	if got, want := s.Off.Origin[0], float64(s.Model.Bytes)*float64(o.Fleet.Nodes); got != want {
		t.Errorf("peers off, the origin served %.0f bytes to %d nodes, want %.0f", got, o.Fleet.Nodes, want)
	}
	md := rep.Markdown()
	for _, h := range []string{"## 10. Fleet", "| 10 | origin bytes", "| 10 | 2 nodes warm"} {
		if !strings.Contains(md, h) {
			t.Errorf("report lacks %q", h)
		}
	}
	t.Logf("report:\n%s", md)
}
