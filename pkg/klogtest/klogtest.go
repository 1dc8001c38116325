// Package klogtest captures klog's output in tests, at a chosen verbosity,
// so that a test can check what the driver logs (and that no secret is
// among it).
package klogtest

import (
	"bytes"
	"flag"
	"io"
	"strconv"
	"sync"
	"testing"

	"k8s.io/klog/v2"
)

// Capture is klog's output since Start.
type Capture struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write implements io.Writer for klog.
func (c *Capture) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

// String flushes klog and returns everything captured.
func (c *Capture) String() string {
	klog.Flush()
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// Start sends klog's output at verbosity v to a Capture until the test
// ends, then discards it again. Not for parallel tests: klog's settings
// are global.
func Start(t testing.TB, v int) *Capture {
	t.Helper()
	flags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(flags)
	set := func(name, value string) {
		if err := flags.Set(name, value); err != nil {
			t.Fatalf("klog flag %s: %v", name, err)
		}
	}
	c := &Capture{}
	set("v", strconv.Itoa(v))
	set("logtostderr", "false")
	set("alsologtostderr", "false")
	klog.SetOutput(c)
	t.Cleanup(func() {
		klog.Flush()
		set("v", "0")
		klog.SetOutput(io.Discard)
	})
	return c
}
