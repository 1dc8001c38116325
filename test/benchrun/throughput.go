package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// ThroughputResult is section 4's machine limits; the cold-download rates
// come from section 1's runs.
type ThroughputResult struct {
	WriteBytes int64
	Write      numbers // MB/s, fsync'd sequential write to the cache filesystem
	Read       model
	ReadMBs    numbers // MB/s, GET of the largest object into io.Discard
}

// throughput measures the two limits a cold download runs into.
func (b *bench) throughput(ctx context.Context, rep *Report) error {
	largest := b.sized[0]
	for _, m := range b.sized {
		if m.Bytes > largest.Bytes {
			largest = m
		}
	}
	res := ThroughputResult{WriteBytes: b.o.WriteBytes, Read: largest}
	buf := make([]byte, 1<<20)
	_, _ = rand.NewChaCha8([32]byte{'f', 's'}).Read(buf)
	dir := filepath.Join(b.work, "write-test")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	for r := range b.o.Runs {
		took, err := b.fsyncWrite(filepath.Join(dir, fmt.Sprint(r)), buf)
		if err != nil {
			return err
		}
		res.Write = append(res.Write, mbps(b.o.WriteBytes, took))
		got, took, err := b.rawRead(ctx, largest.Weights)
		if err != nil {
			return err
		}
		res.ReadMBs = append(res.ReadMBs, mbps(got, took))
		b.logf("run %d: fsync'd write %.0f MB/s, raw read of %s %.0f MB/s", r+1, res.Write[r], largest.Weights, res.ReadMBs[r])
	}
	rep.Throughput = res
	return nil
}

// fsyncWrite writes WriteBytes in 1 MiB writes and fsyncs: open to close.
func (b *bench) fsyncWrite(path string, buf []byte) (time.Duration, error) {
	defer os.Remove(path)
	b.drop()
	start := time.Now()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return 0, err
	}
	for left := b.o.WriteBytes; left > 0; left -= int64(len(buf)) {
		n := min(left, int64(len(buf)))
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return 0, err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return 0, err
	}
	if err := f.Close(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// rawRead GETs one object straight from MinIO into io.Discard, with the
// SDK's response checksum validation off: the remote's limit, nothing more.
func (b *bench) rawRead(ctx context.Context, key string) (int64, time.Duration, error) {
	b.drop()
	start := time.Now()
	out, err := b.s3.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)},
		func(o *s3.Options) { o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired })
	if err != nil {
		return 0, 0, fmt.Errorf("reading %s: %w", key, err)
	}
	n, err := io.CopyBuffer(io.Discard, out.Body, make([]byte, 1<<20))
	out.Body.Close()
	took := time.Since(start)
	if err != nil {
		return 0, 0, fmt.Errorf("reading %s: %w", key, err)
	}
	return n, took, nil
}
