// Package sanity runs the CSI conformance suite (csi-sanity, pinned and
// installed into bin/ by the Makefile) against the real modelcache-csi
// binary serving Identity, Controller and Node on one socket (--mode=all),
// with a parameters file and a secrets file pointing at a loopback MinIO
// that holds a small model. It needs root: the node plugin makes real bind
// mounts.
//
// The suite runs in two passes. The first runs csi-sanity as it is, minus
// the specs that create volumes with the SINGLE_NODE_WRITER access mode
// csi-sanity hard-codes (a modelcache volume is read-only and refuses writer
// modes). The second runs exactly those specs through readerModeProxy, which
// asks for MULTI_NODE_READER_ONLY instead. The Makefile lists the specs and
// the reasons.
package sanity

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
)

var (
	skip        = flag.String("skip", "", "regular expression of csi-sanity specs skipped in both passes (set by the Makefile, with reasons)")
	writerSpecs = flag.String("writer-specs", "", "regular expression of the csi-sanity specs that create volumes with a writer access mode (set by the Makefile)")
)

func TestCSISanity_AllServices_RealMinIO(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("csi-sanity needs root: the node plugin bind-mounts models; run `make test` as root")
	}
	if *writerSpecs == "" {
		t.Fatal("-writer-specs is empty; run through `make sanity`, which sets it")
	}
	sanityBin, err := testenv.Binary("csi-sanity")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	driverBin, err := testenv.BuildDriver(dir)
	if err != nil {
		t.Fatal(err)
	}
	minio, err := testenv.StartMinIO(filepath.Join(dir, "minio"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(minio.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	model := map[string][]byte{"config.json": []byte(`{"hidden_size":8}`), "weights.bin": make([]byte, 64<<10)}
	if err := testenv.PutModel(ctx, testenv.Client(minio.Endpoint), "sanity", "model", model); err != nil {
		t.Fatal(err)
	}

	d, err := testenv.StartDriver(driverBin, dir, filepath.Join(dir, "cache"), "--mode=all")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Stop()
		// make sanity builds the driver with -race, which reports and goes on.
		if races := d.Races(); races != "" {
			t.Errorf("the driver reported data races:\n%s", races)
		}
		if t.Failed() {
			t.Logf("driver logs:\n%s", d.Logs())
		}
	})

	params := filepath.Join(dir, "params.yaml")
	writeYAML(t, params, map[string]string{"modelUri": "mys3:sanity/model"})
	secrets := filepath.Join(dir, "secrets.yaml")
	var b strings.Builder
	for _, kind := range []string{"NodePublishVolumeSecret", "ControllerPublishVolumeSecret", "CreateVolumeSecret", "DeleteVolumeSecret", "ControllerValidateVolumeCapabilitiesSecret"} {
		fmt.Fprintf(&b, "%s:\n", kind)
		for k, v := range testenv.RcloneSecret("mys3", minio.Endpoint) {
			fmt.Fprintf(&b, "  %s: %q\n", k, v)
		}
	}
	if err := os.WriteFile(secrets, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	common := []string{
		"--csi.testvolumeparameters=" + params,
		"--csi.secrets=" + secrets,
		"--csi.mountdir=" + filepath.Join(dir, "mnt"),
		"--csi.stagingdir=" + filepath.Join(dir, "staging"),
		"--ginkgo.no-color",
		"--ginkgo.v",
	}

	t.Run("AsIs", func(t *testing.T) {
		skips := *writerSpecs
		if *skip != "" {
			skips += "|" + *skip
		}
		runSanity(t, sanityBin, append(common, "--csi.endpoint="+d.Socket, "--ginkgo.skip="+skips))
	})

	t.Run("ReaderModes", func(t *testing.T) {
		proxy, err := startReaderModeProxy(filepath.Join(dir, "proxy.sock"), d.Socket)
		if err != nil {
			t.Fatal(err)
		}
		defer proxy.Stop()
		args := append(common, "--csi.endpoint="+filepath.Join(dir, "proxy.sock"), "--ginkgo.focus="+*writerSpecs)
		if *skip != "" {
			args = append(args, "--ginkgo.skip="+*skip)
		}
		runSanity(t, sanityBin, args)
		if proxy.rewritten.Load() == 0 {
			t.Fatal("the proxy rewrote no access mode: the writer-mode specs did not go through it")
		}
	})
}

// runSanity runs csi-sanity and fails t unless it passed and ran something.
func runSanity(t *testing.T, bin string, args []string) {
	t.Helper()
	out, err := exec.Command(bin, args...).CombinedOutput()
	summary := regexp.MustCompile(`(?m)^Ran \d+ of \d+ Specs.*$|^(SUCCESS|FAIL)!.*$`).FindAllString(string(out), -1)
	t.Logf("csi-sanity: %s", strings.Join(summary, " | "))
	if err != nil {
		t.Fatalf("csi-sanity failed: %v\n%s", err, out)
	}
	if len(summary) == 0 || strings.HasPrefix(summary[0], "Ran 0 of") {
		t.Fatalf("csi-sanity ran no spec:\n%s", out)
	}
}

func writeYAML(t *testing.T, path string, m map[string]string) {
	t.Helper()
	var b strings.Builder
	for k, v := range m {
		fmt.Fprintf(&b, "%s: %q\n", k, v)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}
