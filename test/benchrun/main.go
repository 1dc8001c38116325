// Command benchrun measures, side by side in one run on this machine, what
// the node cache costs and saves against the storage-initializer init
// container (`rclone copy`): cold and warm publishes, the second pod,
// throughput against the machine's own limits, the node plugin's memory and
// its restart time, then the side-by-side again through a proxy that plays
// a remote object store (a per-stream rate cap and a time to first byte),
// with an incremental update and a resume after kill -9. Everything runs
// against one loopback MinIO holding models generated at run time. It
// writes docs/benchmarks.md and prints the same tables; `make bench` runs
// it as root.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"k8s.io/apimachinery/pkg/api/resource"
)

// options are what one benchmark run measures and how much.
type options struct {
	Driver, Rclone, Out string
	Oras                string // the oras CLI of section 9 ("": its oci:// models are published, not pulled by oras)
	NpmDir              string // the npm prefix holding @huggingface/hub (section 9)
	Work                string // scratch directory parent ("" is the system default)
	Runs                int    // runs per figure
	Sizes               []int64
	WarmPublishes       int   // publishes per warm series
	ManyFiles           int   // files of the many-small-files model
	SmallFile           int   // bytes per small file
	Pods                int   // N for the second-pod section
	MemPublishes        int   // concurrent warm publishes while measuring memory
	WriteBytes          int64 // bytes of the fsync'd sequential write test
	RestartTrees        int
	RestartRefs         int
	Remote              remoteOptions // section 7
	Scale               scaleOptions  // section 8
	Fleet               fleetOptions  // section 10
	Only                []string      // sections to run (nil: all of them)
	DropCaches          bool
	Smoke               bool
	Log                 io.Writer
}

// Section names, as --only takes them.
const (
	secCold       = "cold"
	secThroughput = "throughput"
	secWarm       = "warm"
	secPods       = "pods"
	secRestart    = "restart"
	secRemote     = "remote"
	secScale      = "scale"
	secSources    = "sources"
	secFleet      = "fleet"
)

var sectionNames = []string{secCold, secThroughput, secWarm, secPods, secRestart, secRemote, secScale, secSources, secFleet}

// runs says whether the run measures section name.
func (o options) runs(name string) bool { return o.Only == nil || slices.Contains(o.Only, name) }

// defaults are the full benchmark's options.
func defaults() options {
	return options{
		Runs: 5, Sizes: []int64{100 << 20, 1 << 30},
		WarmPublishes: 200, ManyFiles: 10000, SmallFile: 1 << 10,
		Pods: 10, MemPublishes: 50, WriteBytes: 1 << 30,
		RestartTrees: 1000, RestartRefs: 200, DropCaches: true,
		Remote: remoteDefaults(),
		Scale:  scaleDefaults(),
		Fleet:  fleetDefaults(),
		Log:    os.Stderr,
	}
}

// smokeOptions runs every section once, small: a check that each path
// works, with numbers that mean nothing.
func smokeOptions() options {
	o := defaults()
	o.Smoke = true
	o.Runs, o.Sizes = 1, []int64{1 << 20}
	o.WarmPublishes, o.ManyFiles = 20, 200
	o.Pods, o.MemPublishes, o.WriteBytes = 3, 5, 16<<20
	o.RestartTrees, o.RestartRefs = 20, 5
	o.Remote, o.Scale, o.Fleet = remoteSmoke(), scaleSmoke(), fleetSmoke()
	// Smoke runs beside other test packages: dropping their page cache
	// would only slow them down.
	o.DropCaches = false
	return o
}

func main() {
	driver := flag.String("driver", "bin/modelcache-csi", "modelcache-csi binary")
	rclone := flag.String("rclone", "bin/rclone", "rclone CLI at the version the driver links (make bench builds it)")
	oras := flag.String("oras", "bin/oras", "oras CLI that section 9 pulls oci:// models with (make bench builds it at the Makefile's pin)")
	npmDir := flag.String("npm", "bin/npm", "npm prefix holding @huggingface/hub, which section 9 downloads hf:// models with (make bench installs it)")
	out := flag.String("out", "docs/benchmarks.md", "Markdown report to write (\"\" for stdout only)")
	runs := flag.Int("runs", 0, "runs per figure (default 5; 1 with --smoke)")
	sizes := flag.String("sizes", "", "comma-separated model sizes for the cold and warm sections (default 100Mi,1Gi)")
	with4G := flag.Bool("with-4g", false, "add a 4 GiB model (needs about 14 GiB free disk)")
	smoke := flag.Bool("smoke", false, "one small run of every section, to check the paths work")
	work := flag.String("work", "", "parent of the scratch directory (default the system temporary directory); the cache filesystem measured is this one")
	only := flag.String("only", "", "comma-separated sections to run, of "+strings.Join(sectionNames, ", ")+" (default all); the report holds only those")
	skipRemote := flag.Bool("skip-remote", false, "skip section 7, the side-by-side through a throttled proxy")
	remoteRuns := flag.Int("remote-runs", 0, "runs per figure of sections 7 and 9 (default 3; 1 with --smoke)")
	remoteRate := flag.String("remote-stream-rate", "", "sections 7 and 9's cap on each response stream, bytes per second: 64MB is 64×10⁶, 64MiB 64×2²⁰, 0 none (default 64MB; 32MB with --smoke)")
	remoteFirstByte := flag.Duration("remote-first-byte", remoteDefaults().FirstByte, "sections 7 and 9's delay before each object response's first byte (section 9: each response's) (0 for none)")
	remoteSize := flag.String("remote-size", "", "sections 7 and 9's large file (default 1Gi): the shards are 8 of an eighth of it, section 7's incremental model a quarter, its resumed file all of it")
	remoteFiles := flag.Int("remote-files", 0, "files of section 7's small-files model, 16 KiB each (default 1000)")
	merge := flag.Bool("merge", false, "with --only: replace in the --out report only the sections run and their goals, keeping the rest as it was")
	scaleSizes := flag.String("scale-sizes", "", "section 8's cache sizes, smallest first, as TREESxFILES per tree (default 10x100,1000x100; 2x10,4x10 with --smoke)")
	flag.Parse()

	o := defaults()
	if *smoke {
		o = smokeOptions()
	}
	o.Driver, o.Rclone, o.Out, o.Work = *driver, *rclone, *out, *work
	o.Oras, o.NpmDir = *oras, *npmDir
	if *runs > 0 {
		o.Runs = *runs
	}
	if *sizes != "" {
		parsed, err := parseSizes(*sizes)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		o.Sizes = parsed
	}
	if *with4G {
		o.Sizes = append(o.Sizes, 4<<30)
	}
	if err := o.Remote.set(*remoteRuns, *remoteRate, *remoteFirstByte, *remoteSize, *remoteFiles); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if *scaleSizes != "" {
		parsed, err := parseScaleSizes(*scaleSizes)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		o.Scale.Sizes = parsed
	}
	if err := o.selectSections(*only, *skipRemote); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if *merge && (o.Only == nil || o.Out == "") {
		fmt.Fprintln(os.Stderr, "--merge needs --only (the sections to replace) and --out (the report to merge into)")
		os.Exit(2)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "benchrun needs root: the node plugin bind-mounts models into target directories, and the page cache is dropped between runs. Run it through `make bench` as root.")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rep, err := run(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchrun failed:", err)
		os.Exit(1)
	}
	md := rep.Markdown()
	fmt.Print(md)
	if o.Out != "" {
		if err := os.MkdirAll(filepath.Dir(o.Out), 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "writing the report:", err)
			os.Exit(1)
		}
		if *merge {
			if md, err = mergeOut(o.Out, md, rep); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
		}
		if err := os.WriteFile(o.Out, []byte(md), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "writing the report:", err)
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "wrote", o.Out)
	}
}

// selectSections applies --only and --skip-remote.
func (o *options) selectSections(only string, skipRemote bool) error {
	picked := sectionNames
	if only != "" {
		picked = nil
		for f := range strings.SplitSeq(only, ",") {
			name := strings.TrimSpace(f)
			if !slices.Contains(sectionNames, name) {
				return fmt.Errorf("--only: %q is not a section; the sections are %s", name, strings.Join(sectionNames, ", "))
			}
			picked = append(picked, name)
		}
	}
	if skipRemote {
		picked = slices.DeleteFunc(slices.Clone(picked), func(s string) bool { return s == secRemote })
	}
	if len(picked) == 0 {
		return fmt.Errorf("--only and --skip-remote leave no section to run")
	}
	if len(picked) < len(sectionNames) {
		o.Only = picked
	}
	return nil
}

// parseSizes reads "100Mi,1Gi".
func parseSizes(s string) ([]int64, error) {
	var out []int64
	for f := range strings.SplitSeq(s, ",") {
		q, err := resource.ParseQuantity(strings.TrimSpace(f))
		if err != nil || q.Value() <= 0 {
			return nil, fmt.Errorf("--sizes: %q is not a size such as 100Mi or 1Gi", f)
		}
		out = append(out, q.Value())
	}
	return out, nil
}
