// Package sanity runs the CSI conformance suite (csi-sanity, pinned and
// installed into bin/ by the Makefile) against the real modelcache-csi
// binary, with a parameters file and a secrets file pointing at a loopback
// MinIO that holds a small model. It needs root: the node plugin makes real
// bind mounts. Which specs are skipped, and why, is listed in the Makefile.
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

var skip = flag.String("skip", "", "regular expression of csi-sanity specs to skip (set by the Makefile, with reasons)")

func TestCSISanity_NodePlugin_RealMinIO(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("csi-sanity needs root: the node plugin bind-mounts models; run `make test` as root")
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

	d, err := testenv.StartDriver(driverBin, dir, filepath.Join(dir, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Stop()
		if t.Failed() {
			t.Logf("driver logs:\n%s", d.Logs())
		}
	})

	params := filepath.Join(dir, "params.yaml")
	writeYAML(t, params, map[string]string{"modelUri": "mys3:sanity/model"})
	secrets := filepath.Join(dir, "secrets.yaml")
	var b strings.Builder
	for _, kind := range []string{"NodePublishVolumeSecret", "ControllerPublishVolumeSecret", "CreateVolumeSecret", "DeleteVolumeSecret"} {
		fmt.Fprintf(&b, "%s:\n", kind)
		for k, v := range testenv.RcloneSecret("mys3", minio.Endpoint) {
			fmt.Fprintf(&b, "  %s: %q\n", k, v)
		}
	}
	if err := os.WriteFile(secrets, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}

	args := []string{
		"--csi.endpoint=" + d.Socket,
		"--csi.testvolumeparameters=" + params,
		"--csi.secrets=" + secrets,
		"--csi.mountdir=" + filepath.Join(dir, "mnt"),
		"--csi.stagingdir=" + filepath.Join(dir, "staging"),
		"--ginkgo.no-color",
		"--ginkgo.v",
	}
	if *skip != "" {
		args = append(args, "--ginkgo.skip="+*skip)
	}
	cmd := exec.Command(sanityBin, args...)
	out, err := cmd.CombinedOutput()
	summary := regexp.MustCompile(`(?m)^Ran \d+ of \d+ Specs.*$|^(SUCCESS|FAIL)!.*$`).FindAllString(string(out), -1)
	t.Logf("csi-sanity: %s", strings.Join(summary, " | "))
	if err != nil {
		t.Fatalf("csi-sanity failed: %v\n%s", err, out)
	}
	if len(summary) == 0 {
		t.Fatalf("csi-sanity printed no summary; it may not have run any spec:\n%s", out)
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
