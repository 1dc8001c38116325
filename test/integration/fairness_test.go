package integration

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fairFlags make the bounds on slow remotes short enough for a test: a
// stream below 64 KiB/s over 2 s is cut, and ranged downloads start at
// 16 MiB so the trickling tenant's file is fetched in chunks.
var fairFlags = []string{"--min-stream-rate=64Ki", "--stall-window=2s", "--download-stall-timeout=30s", "--multi-thread-cutoff=16Mi", "--multi-thread-span=4Mi"}

// One tenant's remote trickles the first range of its large file (a byte
// now and then, which never trips rclone's idle timeout) and serves every
// other range at once, so its finished chunks pile up behind the stalled
// one. Another tenant's 300 MiB cold publish on the same node finishes
// within a few times the time it takes alone, measured first in the same
// test; the trickling publish fails UNAVAILABLE, naming the minimum rate,
// in bounded time. Before downloads shared the node's chunk buffers, the
// second publish got no byte at all while the first trickled.
func TestFair_TricklingRemote_OtherTenantsColdPublishFinishes_RealMinIO(t *testing.T) {
	e := newEnv(t)
	victim := randomModel(200, map[string]int{"w.bin": 300 << 20, "config.json": 500})
	trickler := randomModel(201, map[string]int{"trickle.bin": 64 << 20})
	e.upload("victim", victim)
	e.upload("trickler", trickler)
	cold := func() {
		// A fresh cache, so the victim's publish downloads again.
		e.driver.Stop()
		if err := os.RemoveAll(e.cacheDir()); err != nil {
			t.Fatal(err)
		}
		e.start(fairFlags...)
	}
	timedPublish := func(vol, pod string) time.Duration {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		start := time.Now()
		if err := e.publish(ctx, vol, e.target(pod), e.model("victim"), e.secret()); err != nil {
			t.Fatalf("the victim's publish after %v: %v", time.Since(start), err)
		}
		took := time.Since(start)
		sameFiles(t, e.target(pod), victim)
		e.mustUnpublish(vol, e.target(pod))
		return took
	}

	cold()
	solo := timedPublish("solo", "pod-solo")
	t.Logf("alone, the victim's 300 MiB took %v", solo)

	cold()
	e.proxy.Trickle("trickle.bin", 1<<10)
	e.proxy.Reset()
	type result struct {
		err  error
		took time.Duration
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		start := time.Now()
		err := e.publish(ctx, "trickler", e.target("pod-trickler"), e.model("trickler"), e.secret())
		done <- result{err, time.Since(start)}
	}()
	// The trickling range is in flight, and the others of its file have
	// had a moment to fill the node's chunk buffers.
	for end := time.Now().Add(time.Minute); e.proxy.Trickles() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the trickling tenant's first range never reached the remote")
		}
	}
	time.Sleep(500 * time.Millisecond)

	shared := timedPublish("victim", "pod-victim")
	t.Logf("beside the trickling tenant, the victim's 300 MiB took %v", shared)
	// Generous for a loaded machine, far below "never".
	if bound := 4*solo + 10*time.Second; shared > bound {
		t.Errorf("beside a trickling remote the victim took %v, more than %v (4× its %v alone, plus 10 s)", shared, bound, solo)
	}

	var r result
	select {
	case r = <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("the trickling publish did not end within 2 minutes")
	}
	wantCode(t, r.err, codes.Unavailable)
	if msg := status.Convert(r.err).Message(); !strings.Contains(msg, "--min-stream-rate") {
		t.Errorf("the trickling publish's message does not say why: %q", msg)
	}
	// Three attempts of the stalled chunk, a stall window each.
	if r.took > 30*time.Second {
		t.Errorf("the trickling publish failed after %v, want within 30 s", r.took)
	}
	t.Logf("the trickling publish failed after %v: %v", r.took, r.err)
	e.proxy.Trickle("", 0)
}

// The requests made with rclone's own API client beside its GETs (the
// checksum HEAD, and a HEAD of every part when a multipart ETag has to be
// checked against the parts' real sizes) take the node's connections as
// GETs do: with --max-connections=1 the remote never answers more than one
// object request at a time. The object's parts are unequal although their
// sizes add up as if equal, so every part is asked for (four HEADs, which
// ran at once beside the bound before).
func TestFair_ChecksumHEADsTakeConnections_RealMinIO(t *testing.T) {
	const mib = 1 << 20
	e := newEnv(t)
	e.driver.Stop()
	e.start("--max-connections=1")
	sizes := []int{6 * mib, 5 * mib, 7 * mib, 4 * mib}
	files := randomModel(202, map[string]int{"unequal.bin": 22 * mib})
	e.uploadParts("m/unequal.bin", files["unequal.bin"], sizes, nil, noChecksum)
	// Every HEAD takes a while, so that HEADs not bounded would overlap.
	e.proxy.FirstByteDelay.Store(int64(200 * time.Millisecond))
	e.proxy.Reset()

	e.mustPublish("vol", e.target("pod"), e.model("m"))
	sameFiles(t, e.target("pod"), files)
	if heads := e.proxy.ObjectHeads(); heads < int64(1+len(sizes)) {
		t.Fatalf("the remote answered %d object HEADs, want the checksum's and one per part (%d)", heads, 1+len(sizes))
	}
	if got := e.proxy.MaxInFlight(); got != 1 {
		t.Errorf("%d object requests (GETs and HEADs) were in flight at once, want 1 (--max-connections=1)", got)
	}
	e.mustUnpublish("vol", e.target("pod"))
}
