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
	"runtime"
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

// RepoRoot is the repository root, found from this file's location.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
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
