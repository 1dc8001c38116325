package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/test/testenv"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
)

// RestartResult is section 6.
type RestartResult struct {
	Trees, Refs int       // in the state database
	LiveMounts  int       // live mounts the driver reported recovering
	Build       durations // building that state, once
	Empty, Full durations // start to Probe ready: empty cache, full state
}

// restart times a driver's start until Probe answers ready, with an empty
// cache and with a state database of RestartTrees trees and RestartRefs
// references whose bind mounts are live. The state is built with the
// store and state packages directly (an in-memory fetcher, real commits),
// the mounts with pkg/mount, as a driver would have left them.
func (b *bench) restart(ctx context.Context, rep *Report) error {
	runDir := filepath.Join(b.work, "restart")
	cacheDir := filepath.Join(runDir, "cache")
	res := RestartResult{Trees: b.o.RestartTrees, Refs: b.o.RestartRefs}
	start := time.Now()
	targets, err := buildState(ctx, runDir, cacheDir, b.o.RestartTrees, b.o.RestartRefs)
	defer func() {
		k := mount.NewKernel()
		for _, t := range targets {
			_ = k.Unpublish(t)
		}
	}()
	if err != nil {
		return err
	}
	res.Build = durations{time.Since(start)}
	b.logf("built %d trees and %d mounted references in %s", res.Trees, res.Refs, fmtDur(res.Build[0]))
	// The baseline is a restart too: its first start, which creates the
	// database and the node key, is not timed.
	emptyRun := filepath.Join(b.work, "restart-empty")
	if _, _, err := timeStart(ctx, b.o.Driver, emptyRun, filepath.Join(emptyRun, "cache")); err != nil {
		return err
	}
	for r := range b.o.Runs {
		empty, _, err := timeStart(ctx, b.o.Driver, emptyRun, filepath.Join(emptyRun, "cache"))
		if err != nil {
			return err
		}
		full, live, err := timeStart(ctx, b.o.Driver, runDir, cacheDir)
		if err != nil {
			return err
		}
		if live != res.Refs {
			return fmt.Errorf("the driver recovered %d live mounts; %d were made", live, res.Refs)
		}
		res.LiveMounts = live
		res.Empty = append(res.Empty, empty)
		res.Full = append(res.Full, full)
		b.logf("run %d: start to ready %s empty, %s with %d trees and %d live references", r+1, fmtDur(empty), fmtDur(full), res.Trees, live)
	}
	rep.Restart = res
	return nil
}

// memFetcher serves one-file models from memory.
type memFetcher map[string][]byte

func (f memFetcher) Open(_ context.Context, e source.Entry) (io.ReadCloser, error) {
	b, ok := f[e.Path]
	if !ok {
		return nil, fmt.Errorf("no object %s", e.Path)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

// buildState commits trees distinct one-file models of 1 KiB into a store
// under cacheDir, records a source for each, bind-mounts the first refs
// under runDir and records those references. It returns the targets.
func buildState(ctx context.Context, runDir, cacheDir string, trees, refs int) (targets []string, err error) {
	db, err := state.Open(filepath.Join(cacheDir, "state", "modelcache.db"))
	if err != nil {
		return nil, err
	}
	defer db.Close()
	st, err := store.Open(cacheDir, db, store.Options{Transfers: 4})
	if err != nil {
		return nil, err
	}
	defer st.Close()

	digests := make([]string, trees)
	when := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for i := range trees {
		g.Go(func() error {
			body := make([]byte, 1<<10)
			_, _ = rand.NewChaCha8([32]byte{'r', byte(i), byte(i >> 8), byte(i >> 16)}).Read(body)
			m := source.Manifest{{Path: "model.bin", Size: int64(len(body)), ModTime: when}}
			uri := fmt.Sprintf("mys3:restart/model-%d", i)
			t, _, err := st.Ensure(gctx, source.ContentKey("bench-restart/"+uri, m), m, memFetcher{"model.bin": body})
			if err != nil {
				return err
			}
			digests[i] = t.Digest
			return db.RecordSource("bench-source-"+strconv.Itoa(i), state.Source{Tree: t.Digest, URI: uri, Checked: when})
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	k := mount.NewKernel()
	for i := range min(refs, trees) {
		pod := fmt.Sprintf("restart-pod-%d", i)
		target := filepath.Join(runDir, "pods", pod, "volumes", "kubernetes.io~csi", "model", "mount")
		if err := k.BindReadOnly(st.TreePath(digests[i]), target); err != nil {
			return targets, err
		}
		targets = append(targets, target)
		ref := state.Ref{VolumeID: "csi-" + pod, TargetPath: target, Tree: digests[i], ArgsHash: "bench",
			URI: fmt.Sprintf("mys3:restart/model-%d", i), PodName: pod, PodNS: "default",
			PodUID: fmt.Sprintf("0d6a4a6e-0000-4000-8000-%012x", i), Published: time.Now()}
		if err := db.AddRef(ref, "bench-source-"+strconv.Itoa(i)); err != nil {
			return targets, err
		}
	}
	return targets, nil
}

var liveMounts = regexp.MustCompile(`liveMounts=(\d+)`)

// timeStart starts the driver with testenv.StartDriver's arguments and
// times from just before the process starts until Probe first answers
// ready. The gRPC client retries every few milliseconds (its default
// backoff starts at a second), so the figure is the driver's, not the
// client's. It stops the driver with SIGTERM and returns the live mounts
// it logged recovering.
func timeStart(ctx context.Context, bin, runDir, cacheDir string) (time.Duration, int, error) {
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return 0, 0, err
	}
	sock := filepath.Join(runDir, "csi.sock")
	cmd := exec.Command(bin, "--mode=node", "--endpoint=unix://"+sock, "--node-id=test-node", "--cache-dir="+cacheDir,
		"--min-free=0", "--kubelet-dir="+runDir, "--allow-endpoint=127.0.0.1/32", "-v=0")
	var logs testenv.SyncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: time.Millisecond, Multiplier: 1.2, MaxDelay: 3 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	if err != nil {
		return 0, 0, err
	}
	defer conn.Close()
	id := csipb.NewIdentityClient(conn)

	exited := make(chan struct{})
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-pctx.Done():
		}
	}()
	var took time.Duration
	for {
		resp, err := id.Probe(pctx, &csipb.ProbeRequest{}, grpc.WaitForReady(true))
		if err == nil && resp.GetReady().GetValue() {
			took = time.Since(start)
			break
		}
		if pctx.Err() != nil {
			return 0, 0, fmt.Errorf("modelcache-csi did not become ready: %v\n%s", err, logs.String())
		}
		time.Sleep(time.Millisecond)
	}
	live := 0
	if m := liveMounts.FindStringSubmatch(logs.String()); m != nil {
		live, _ = strconv.Atoi(m[1])
	}
	return took, live, nil
}
