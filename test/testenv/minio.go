// Package testenv starts what the integration tests, the demo and the
// benchmarks need: a loopback MinIO, a counting proxy in front of it, and the
// modelcache-csi binary. Every server listens on 127.0.0.1 only and is
// stopped by whoever started it.
package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// Root credentials of the test MinIO. They are test fixtures, not secrets.
const (
	AccessKey = "modelcache-test"
	SecretKey = "modelcache-test-secret"
)

// RepoRoot is the repository root: the nearest directory up from the
// working directory whose go.mod declares this module. A test runs in its
// package's directory, go run where it was called. Not this file's
// compiled-in path: the harnesses build with -trimpath (as the driver's
// images do, so that the two share one build of the packages they both
// link), which leaves none.
func RepoRoot() string {
	dir, err := os.Getwd()
	if err != nil {
		panic(fmt.Sprintf("finding the repository root: %v", err))
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && declaresModule(b) {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			panic("finding the repository root: no go.mod of " + modulePath + " above the working directory; run from inside the repository")
		}
		dir = parent
	}
}

// modulePath is this repository's module.
const modulePath = "github.com/modelcache/modelcache"

// declaresModule says whether a go.mod is this repository's, not that of
// a tool module inside it (test/e2e/tools).
func declaresModule(gomod []byte) bool {
	for line := range strings.Lines(string(gomod)) {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`) == modulePath
		}
	}
	return false
}

// Binary returns the path of a tool the Makefile installs into bin/, or an
// error that says how to get it.
func Binary(name string) (string, error) {
	p := filepath.Join(RepoRoot(), "bin", name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not found at %s: run `make tools` (or `make test`), which installs it at its pinned version", name, p)
	}
	return p, nil
}

// MinIO is a running MinIO server on loopback.
type MinIO struct {
	Endpoint string // http://127.0.0.1:port
	cmd      *exec.Cmd
	out      *bytes.Buffer
}

// StartMinIO starts MinIO with its data in dir and waits until it is ready.
func StartMinIO(dir string) (*MinIO, error) {
	bin, err := Binary("minio")
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	cport, err := FreePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(bin, "server", "--quiet", "--address", addr, "--console-address", fmt.Sprintf("127.0.0.1:%d", cport), dir)
	cmd.Env = append(os.Environ(), "MINIO_ROOT_USER="+AccessKey, "MINIO_ROOT_PASSWORD="+SecretKey,
		"MINIO_BROWSER=off", "MINIO_UPDATE=off", "MINIO_CI_CD=1")
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting minio: %w", err)
	}
	m := &MinIO{Endpoint: "http://" + addr, cmd: cmd, out: out}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(m.Endpoint + "/minio/health/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return m, nil
			}
		}
		if time.Now().After(deadline) {
			m.Stop()
			return nil, fmt.Errorf("minio did not become ready: %s", out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop kills MinIO and waits for it.
func (m *MinIO) Stop() {
	if m.cmd.Process != nil {
		_ = m.cmd.Process.Kill()
		_ = m.cmd.Wait()
	}
}

// Client returns an S3 client for fixtures, pointed at endpoint.
func Client(endpoint string) *s3.Client {
	return s3.New(s3.Options{
		BaseEndpoint: aws.String(endpoint),
		Region:       "us-east-1",
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(AccessKey, SecretKey, ""),
	})
}

// PutModel creates bucket (if needed) and uploads files under prefix.
func PutModel(ctx context.Context, c *s3.Client, bucket, prefix string, files map[string][]byte) error {
	_, err := c.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(bucket)})
	if err != nil && !isBucketExists(err) {
		return fmt.Errorf("creating bucket %s: %w", bucket, err)
	}
	for name, data := range files {
		key := name
		if prefix != "" {
			key = prefix + "/" + name
		}
		_, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key), Body: bytes.NewReader(data)})
		if err != nil {
			return fmt.Errorf("uploading %s: %w", key, err)
		}
	}
	return nil
}

func isBucketExists(err error) bool {
	var owned interface{ ErrorCode() string }
	if errors.As(err, &owned) {
		c := owned.ErrorCode()
		return c == "BucketAlreadyOwnedByYou" || c == "BucketAlreadyExists"
	}
	return false
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// RcloneSecret is a node-publish secret defining remote name against
// endpoint, in Seldon's seldon-rclone-secret form.
func RcloneSecret(name, endpoint string) map[string]string {
	p := "RCLONE_CONFIG_" + upper(name) + "_"
	return map[string]string{
		p + "TYPE":              "s3",
		p + "PROVIDER":          "Minio",
		p + "ENDPOINT":          endpoint,
		p + "ENV_AUTH":          "false",
		p + "ACCESS_KEY_ID":     AccessKey,
		p + "SECRET_ACCESS_KEY": SecretKey,
	}
}

func upper(s string) string {
	b := []byte(s)
	for i, c := range b {
		switch {
		case c >= 'a' && c <= 'z':
			b[i] = c - 32
		case c == '-':
			b[i] = '_'
		}
	}
	return string(b)
}
