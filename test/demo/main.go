// Command demo shows modelcache's main job end to end on this machine: a
// loopback MinIO holding a generated model, the node plugin on a temporary
// socket, a cold then a warm publish as kubelet would send them, the mounted
// files, both timings, and a clean unpublish. Run it with `make demo`.
package main

import (
	"context"
	"flag"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/test/testenv"
)

func main() {
	driver := flag.String("driver", "bin/modelcache-csi", "modelcache-csi binary")
	sizeMiB := flag.Int("model-mib", 256, "size of the generated model weights in MiB")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "make demo needs root: the node plugin bind-mounts the cached model into target directories, as it does on a Kubernetes node. Run it as root (sudo make demo).")
		os.Exit(2)
	}
	if err := run(*driver, *sizeMiB); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func run(driverBin string, sizeMiB int) error {
	ctx := context.Background()
	work, err := os.MkdirTemp("", "modelcache-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	step("starting MinIO on loopback")
	minio, err := testenv.StartMinIO(filepath.Join(work, "minio"))
	if err != nil {
		return err
	}
	defer minio.Stop()
	proxy, err := testenv.StartProxy(minio.Endpoint)
	if err != nil {
		return err
	}
	defer proxy.Stop()

	model := generateModel(sizeMiB)
	var total int64
	for _, b := range model {
		total += int64(len(b))
	}
	step(fmt.Sprintf("uploading a generated model (%d files, %d MiB) to bucket init-container", len(model), total>>20))
	if err := testenv.PutModel(ctx, testenv.Client(minio.Endpoint), "init-container", "", model); err != nil {
		return err
	}

	step("starting the node plugin (modelcache-csi --mode=node)")
	d, err := testenv.StartDriver(driverBin, work, filepath.Join(work, "cache"))
	if err != nil {
		return err
	}
	defer d.Stop()

	secret := testenv.RcloneSecret("mys3", proxy.URL)
	attrs := map[string]string{"modelUri": "mys3:init-container"}
	targets := []string{
		filepath.Join(work, "kubelet/pods/pod-a/volumes/kubernetes.io~csi/models/mount"),
		filepath.Join(work, "kubelet/pods/pod-b/volumes/kubernetes.io~csi/models/mount"),
	}
	var took [2]time.Duration
	for i, target := range targets {
		kind := []string{"cold (downloads the model)", "warm (same node, second pod)"}[i]
		step("NodePublishVolume " + kind)
		start := time.Now()
		_, err := d.Node.NodePublishVolume(ctx, testenv.PublishRequest(fmt.Sprintf("csi-demo-%d", i), target, attrs, secret))
		took[i] = time.Since(start)
		if err != nil {
			return fmt.Errorf("publish %d: %w", i, err)
		}
		fmt.Printf("    published at %s in %s\n", target, took[i].Round(time.Microsecond))
	}

	step("files the second pod sees at its mount")
	_ = filepath.WalkDir(targets[1], func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		info, _ := e.Info()
		rel, _ := filepath.Rel(targets[1], p)
		fmt.Printf("    %s %10d  %s\n", info.Mode(), info.Size(), rel)
		return nil
	})
	err = os.WriteFile(filepath.Join(targets[1], "config.json"), []byte("{}"), 0o644)
	fmt.Printf("    writing into the mount: %v\n", err)

	for i, target := range targets {
		if _, err := d.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("csi-demo-%d", i), TargetPath: target}); err != nil {
			return fmt.Errorf("unpublish %d: %w", i, err)
		}
	}
	step("unpublished both targets; stopping")

	fmt.Println()
	fmt.Printf("model:                %d files, %.1f MiB\n", len(model), float64(total)/(1<<20))
	fmt.Printf("cold publish:         %s\n", took[0].Round(time.Microsecond))
	fmt.Printf("warm publish:         %s\n", took[1].Round(time.Microsecond))
	fmt.Printf("warm is faster by:    %.0fx\n", float64(took[0])/float64(took[1]))
	fmt.Printf("bytes from remote:    %d (model is %d: fetched once for two pods)\n", proxy.ObjectBytes(), total)
	return nil
}

func step(s string) { fmt.Println("==>", s) }

// generateModel returns a small model laid out like a Hugging Face checkpoint.
func generateModel(sizeMiB int) map[string][]byte {
	r := rand.NewChaCha8([32]byte{'m', 'o', 'd', 'e', 'l'})
	weights := make([]byte, sizeMiB<<20)
	_, _ = r.Read(weights)
	tok := []byte(strings.Repeat(`{"token":"hello","id":1},`, 40000))
	return map[string][]byte{
		"config.json":                   []byte(`{"architectures":["DemoForCausalLM"],"hidden_size":1024}`),
		"tokenizer/tokenizer.json":      tok,
		"tokenizer/special_tokens.json": []byte(`{"bos":"<s>","eos":"</s>"}`),
		"model.safetensors":             weights,
	}
}
