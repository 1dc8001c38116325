package testenv

import (
	"context"
	"fmt"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
)

// adminTimeout bounds one call; the models tests use are small.
const adminTimeout = 2 * time.Minute

// NewAdmin returns the operator API's client for the driver listening on
// socket, strict: replies decode into pkg/adminapi's types with unknown
// fields and events refused, so the client and the server cannot drift
// apart unnoticed.
func NewAdmin(socket string) *adminapi.Client {
	c := adminapi.NewClient(socket)
	c.Strict, c.Timeout = true, adminTimeout
	return c
}

// WaitAdmin polls until the API on socket answers, for a driver that has
// just started: the socket is served beside the CSI endpoint, not before it.
func WaitAdmin(socket string, timeout time.Duration) error {
	c := NewAdmin(socket)
	deadline := time.Now().Add(timeout)
	for {
		_, err := c.DU(context.Background())
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("admin API on %s did not answer within %s: %w", socket, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
