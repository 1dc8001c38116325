// Command modelcache-csi is the modelcache CSI driver: flags, wiring and
// signals only; behaviour lives in pkg/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/modelcache/modelcache/pkg/csi"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"k8s.io/klog/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	klog.InitFlags(nil)
	var (
		mode        = flag.String("mode", "node", "which CSI services to serve: node, controller or all")
		endpoint    = flag.String("endpoint", "unix:///csi/csi.sock", "CSI endpoint")
		nodeID      = flag.String("node-id", "", "this node's name (required in node mode)")
		cacheDir    = flag.String("cache-dir", "/var/lib/modelcache", "directory holding the model cache")
		transfers   = flag.Int("transfers", 4, "files of one model downloaded in parallel")
		showVersion = flag.Bool("version", false, "print the version and exit")
	)
	flag.Parse()
	if *showVersion {
		fmt.Println("modelcache-csi", version)
		return
	}
	if err := run(*mode, *endpoint, *nodeID, *cacheDir, *transfers); err != nil {
		klog.ErrorS(err, "modelcache-csi failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func run(mode, endpoint, nodeID, cacheDir string, transfers int) error {
	switch mode {
	case "node":
	case "controller", "all":
		return fmt.Errorf("--mode=%s: the controller service is not available in this build; use --mode=node", mode)
	default:
		return fmt.Errorf("--mode must be node, controller or all, not %q", mode)
	}
	if nodeID == "" {
		return errors.New("--node-id is required in node mode (pass the node name, e.g. from spec.nodeName)")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	db, err := state.Open(filepath.Join(cacheDir, "state", "modelcache.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	st, err := store.Open(cacheDir, db, store.Options{Transfers: transfers})
	if err != nil {
		return err
	}
	defer st.Close()
	key, err := db.NodeKey()
	if err != nil {
		return err
	}
	node := &csi.Node{
		NodeID:   nodeID,
		Resolver: source.NewRclone(key),
		Store:    st,
		State:    db,
		Mounter:  mount.NewKernel(),
	}
	live, gone, err := node.Recover()
	if err != nil {
		return fmt.Errorf("recovering references: %w", err)
	}
	klog.InfoS("state recovered", "liveMounts", live, "missingMounts", gone)

	l, err := csi.Listen(endpoint)
	if err != nil {
		return err
	}
	srv := csi.NewServer(&csi.Identity{Version: version}, node, nil)
	klog.InfoS("serving", "driver", csi.DriverName, "version", version, "mode", mode, "endpoint", endpoint, "cacheDir", cacheDir)
	// Mounts are left in place on exit: they are kernel bind mounts that
	// pods keep using, and the next start finds them again (invariant 5).
	return csi.Serve(ctx, srv, l, 25*time.Second)
}
