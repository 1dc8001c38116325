package main

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"github.com/modelcache/modelcache/test/e2e/cluster"
	"github.com/modelcache/modelcache/test/testenv"
	"github.com/modelcache/modelcache/test/testenv/nodes"
	"k8s.io/client-go/rest"
)

// fleetOptions size section 10: one model to several node plugins, each in
// its own network namespace, through an origin whose total egress is
// capped (test/testenv/nodes).
type fleetOptions struct {
	Runs      int
	Nodes     int
	Size      int64         // the model's weights, uploaded in parts as minio-go does
	PartSize  int64         // minio-go's part size
	Total     int64         // the origin's egress cap, bytes per second, all streams together
	Stream    int64         // the cap on each response stream
	FirstByte time.Duration // before each object response's first byte
}

func fleetDefaults() fleetOptions {
	return fleetOptions{Runs: 2, Nodes: 8, Size: 1 << 30, PartSize: 16 << 20, Total: 100e6, Stream: 64e6, FirstByte: 20 * time.Millisecond}
}

// fleetSmoke is two nodes and a model of two parts of S3's least size.
func fleetSmoke() fleetOptions {
	return fleetOptions{Runs: 1, Nodes: 2, Size: 10 << 20, PartSize: 5 << 20, Total: 100e6, Stream: 64e6, FirstByte: 20 * time.Millisecond}
}

// Goal limits of section 10.
const (
	goalFleetOrigin = 1.1 // origin bytes / model bytes, all nodes publishing at once
	goalFleetTime   = 1.5 // all nodes warm / one node's cold publish
)

// FleetRun is one publish of the model on every node of a fleet at once.
type FleetRun struct {
	Nodes  int
	Peers  bool
	Took   durations // until the last node's publish returned
	Origin numbers   // object bytes the origin served, in all
	Peer   numbers   // bytes the nodes read from each other, in all
}

// FleetResult is section 10.
type FleetResult struct {
	Options fleetOptions
	Model   model
	One     FleetRun // one node, cold: what every node of a fleet pays today
	All     FleetRun // every node at once, peers on
	Off     FleetRun // every node at once, peers off (as before peers)
}

// fleet starts a control plane (etcd and kube-apiserver, as make fleet
// does) and, for each run, three fleets of node plugins over one capped
// origin: one node alone, all nodes with peers, all nodes without.
func (b *bench) fleet(ctx context.Context, rep *Report) error {
	o := b.o.Fleet
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cp, err := cluster.StartControlPlane(cctx, cluster.ControlPlaneConfig{Bin: filepath.Join(testenv.RepoRoot(), "bin"), Work: filepath.Join(b.work, "controlplane")})
	if err != nil {
		return fmt.Errorf("starting etcd and kube-apiserver (make fleet builds them into bin/): %w", err)
	}
	defer cp.Stop()
	admin := rest.CopyConfig(cp.Rest)
	admin.QPS, admin.Burst = 100, 200

	m := model{Name: sizeName(o.Size) + " file uploaded in parts of " + sizeName(o.PartSize), Prefix: "fleet", Size: o.Size, Bytes: o.Size, Files: 1, Weights: "fleet/model.safetensors"}
	buf := make([]byte, o.Size)
	fill(m.Weights, buf)
	b.logf("uploading %s (%s) in parts of %s", m.Weights, sizeName(o.Size), sizeName(o.PartSize))
	if err := (testenv.Upload{Name: "minio-go parts", PartSize: uint64(o.PartSize)}).Put(ctx, b.minio.Endpoint, bucket, m.Weights, buf); err != nil {
		return err
	}
	buf = nil
	debug.FreeOSMemory()

	res := FleetResult{Options: o, Model: m, One: FleetRun{Nodes: 1, Peers: true}, All: FleetRun{Nodes: o.Nodes, Peers: true}, Off: FleetRun{Nodes: o.Nodes}}
	for r := range o.Runs {
		for _, fr := range []*FleetRun{&res.One, &res.All, &res.Off} {
			if err := b.fleetRun(ctx, admin, m, fr, r); err != nil {
				return err
			}
		}
	}
	rep.Fleet = res
	return nil
}

// fleetRun starts a fleet of fr.Nodes plugins, publishes m on all of them
// at once, checks every node's bytes and adds the figures to fr.
func (b *bench) fleetRun(ctx context.Context, admin *rest.Config, m model, fr *FleetRun, r int) error {
	o := b.o.Fleet
	sctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	f, err := nodes.Start(sctx, nodes.Config{Nodes: fr.Nodes, DriverBin: b.o.Driver, Admin: admin, Origin: b.minio.Endpoint, Peers: fr.Peers})
	if err != nil {
		return fmt.Errorf("starting %d node plugins: %w", fr.Nodes, err)
	}
	defer f.Close()
	f.Origin.RateBytesPerSec.Store(o.Stream)
	f.Origin.TotalBytesPerSec.Store(o.Total)
	f.Origin.FirstByteDelay.Store(int64(o.FirstByte))
	sec := testenv.RcloneSecret("mys3", f.Origin.URL)

	b.drop()
	pctx, pcancel := context.WithTimeout(ctx, 30*time.Minute)
	defer pcancel()
	errs := make([]error, len(f.Nodes))
	start := time.Now()
	var wg sync.WaitGroup
	for i, n := range f.Nodes {
		wg.Go(func() { _, errs[i] = n.Publish(pctx, "fleet", m.URI(), sec) })
	}
	wg.Wait()
	took := time.Since(start)
	var peer int64
	for i, n := range f.Nodes {
		if errs[i] != nil {
			return fmt.Errorf("publishing on %s: %w", n.Name, errs[i])
		}
		if err := checkModel(n.Target("fleet"), m); err != nil {
			return err
		}
		peer += f.PeerBytes(n)
	}
	origin := f.Origin.ObjectBytes()
	fr.Took, fr.Origin, fr.Peer = append(fr.Took, took), append(fr.Origin, float64(origin)), append(fr.Peer, float64(peer))
	b.logf("%d node(s), peers %v, run %d: all warm in %s; the origin served %s, the nodes each other %s",
		fr.Nodes, fr.Peers, r+1, fmtDur(took), mibName(float64(origin)), mibName(float64(peer)))
	return nil
}

func (r *Report) fleetSection(w writer) {
	s := r.Fleet
	o := s.Options
	w("\n## 10. Fleet\n\n%d node plugins (`test/testenv/nodes`: each in its own network namespace with its own cache, a real kube-apiserver and etcd) publish one model, a %s, at once; the origin is MinIO behind a proxy capping its egress at %s in all and each stream at %s, %s to each first byte. Peers on: the nodes coordinate through Leases and read from each other (docs/design.md \"Peers\"); peers off: each node fetches from the origin, as before peers.\n\n",
		o.Nodes, s.Model.Name, rateName(o.Total), rateName(o.Stream), durName(o.FirstByte))
	w("| | until all are warm | origin bytes / model | bytes between nodes |\n|---|---|---|---|\n")
	for _, x := range []struct {
		name string
		fr   FleetRun
	}{{"one node alone (a cold publish)", s.One}, {fmt.Sprintf("%d nodes, peers on", s.All.Nodes), s.All}, {fmt.Sprintf("%d nodes, peers off", s.Off.Nodes), s.Off}} {
		w("| %s | %s | %s | %s |\n", x.name, fmtDurs(x.fr.Took), fmtNums(perModel(x.fr.Origin, s.Model.Bytes), "×"), fmtBytes(x.fr.Peer))
	}
	if d := s.All.Took.Median(); d > 0 {
		w("\nBetween nodes the fleet moved %s while all were warming (peer bytes over that time, median run).\n", rateName(int64(s.All.Peer.Median()/d.Seconds()/1e6)*1e6))
	}
}

// fleetGoals are section 10's goals.
func (r *Report) fleetGoals() []Goal {
	s := r.Fleet
	if len(s.All.Took) == 0 {
		return nil
	}
	origin := s.All.Origin.Median() / float64(s.Model.Bytes)
	t := ratio(s.All.Took, s.One.Took)
	return []Goal{
		{"10", fmt.Sprintf("origin bytes for %d nodes ≤ %.1f× the model (peers off: %.1f×)", s.All.Nodes, goalFleetOrigin, s.Off.Origin.Median()/float64(s.Model.Bytes)),
			fmt.Sprintf("%.2f×", origin), metStr(origin <= goalFleetOrigin)},
		{"10", fmt.Sprintf("%d nodes warm ≤ %.1f× one node's cold publish (peers off: %.2f×)", s.All.Nodes, goalFleetTime, ratio(s.Off.Took, s.One.Took)),
			fmt.Sprintf("%.2f× (%s against %s)", t, fmtDur(s.All.Took.Median()), fmtDur(s.One.Took.Median())), metStr(t <= goalFleetTime)},
	}
}

// perModel is each count of bytes as a multiple of the model's.
func perModel(n numbers, model int64) numbers {
	out := make(numbers, len(n))
	for i, x := range n {
		out[i] = x / float64(model)
	}
	return out
}

// fmtBytes is the median and range of byte counts.
func fmtBytes(n numbers) string {
	if len(n) == 0 {
		return "-"
	}
	if n.Min() == n.Max() {
		return mibName(n[0])
	}
	return fmt.Sprintf("%s (%s–%s)", mibName(n.Median()), mibName(n.Min()), mibName(n.Max()))
}

// mibName is a byte count in MiB, thousands separated.
func mibName(b float64) string { return thousands(int(b/(1<<20)+0.5)) + " MiB" }
