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

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/csi"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"k8s.io/klog/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type options struct {
	mode, endpoint, nodeID, cacheDir, kubeconfig string
	transfers                                    int
}

func main() {
	klog.InitFlags(nil)
	var o options
	flag.StringVar(&o.mode, "mode", "node", "which CSI services to serve: node, controller, or all (both on one socket)")
	flag.StringVar(&o.endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint")
	flag.StringVar(&o.nodeID, "node-id", "", "this node's name (required in node and all modes)")
	flag.StringVar(&o.cacheDir, "cache-dir", "/var/lib/modelcache", "directory holding the model cache and the state database")
	flag.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for reading PVC annotations in controller mode; empty means the pod's service account when in a cluster")
	flag.IntVar(&o.transfers, "transfers", 4, "files of one model downloaded in parallel")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("modelcache-csi", version)
		return
	}
	if err := run(o); err != nil {
		klog.ErrorS(err, "modelcache-csi failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func run(o options) error {
	var withNode, withController bool
	switch o.mode {
	case "node":
		withNode = true
	case "controller":
		withController = true
	case "all":
		withNode, withController = true, true
	default:
		return fmt.Errorf("--mode must be node, controller or all, not %q", o.mode)
	}
	if withNode && o.nodeID == "" {
		return errors.New("--node-id is required in node and all modes (pass the node name, e.g. from spec.nodeName)")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	db, err := state.Open(filepath.Join(o.cacheDir, "state", "modelcache.db"))
	if err != nil {
		return err
	}
	defer db.Close()
	key, err := db.NodeKey()
	if err != nil {
		return err
	}
	resolver := source.NewRclone(key)

	var node *csi.Node
	if withNode {
		st, err := store.Open(o.cacheDir, db, store.Options{Transfers: o.transfers})
		if err != nil {
			return err
		}
		defer st.Close()
		node = &csi.Node{NodeID: o.nodeID, Resolver: resolver, Store: st, State: db, Mounter: mount.NewKernel()}
		live, gone, err := node.Recover()
		if err != nil {
			return fmt.Errorf("recovering references: %w", err)
		}
		klog.InfoS("state recovered", "liveMounts", live, "missingMounts", gone)
	}
	var ctrl *csi.Controller
	if withController {
		ctrl = &csi.Controller{Resolver: resolver, Volumes: db}
		claims, err := claimReader(o.kubeconfig)
		if err != nil {
			return err
		}
		if claims != nil {
			ctrl.Claims = claims
		}
	}

	l, err := csi.Listen(o.endpoint)
	if err != nil {
		return err
	}
	// Typed nil pointers would register a service that panics; pass nil interfaces.
	var nodeSrv csipb.NodeServer
	if node != nil {
		nodeSrv = node
	}
	var ctrlSrv csipb.ControllerServer
	if ctrl != nil {
		ctrlSrv = ctrl
	}
	srv := csi.NewServer(&csi.Identity{Version: version, Controller: withController}, nodeSrv, ctrlSrv)
	klog.InfoS("serving", "driver", csi.DriverName, "version", version, "mode", o.mode, "endpoint", o.endpoint, "cacheDir", o.cacheDir)
	// Mounts are left in place on exit: they are kernel bind mounts that
	// pods keep using, and the next start finds them again (invariant 5).
	return csi.Serve(ctx, srv, l, 25*time.Second)
}

// claimReader connects to the API server for PVC annotations. Outside a
// cluster and without --kubeconfig the controller works from StorageClass
// parameters alone.
func claimReader(kubeconfig string) (*kube.Claims, error) {
	if kubeconfig == "" && os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		klog.InfoS("not in a cluster and no --kubeconfig: PVC annotations will not be read; models come from StorageClass parameters")
		return nil, nil
	}
	claims, err := kube.Connect(kubeconfig)
	if err != nil {
		return nil, err
	}
	return claims, nil
}
