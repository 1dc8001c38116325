package source

import (
	"context"
	"io"
	"testing"
	"time"
)

// A remote closes its connections once its last request has ended, for
// List, Open and Verify alike: rclone's transport would keep them idle for
// a minute, and one transport per publish adds up to thousands of sockets
// (and proxy pipes) in a burst of publishes.
func TestRemoteClosesItsConnectionsOnceIdle(t *testing.T) {
	ctx := context.Background()
	s3 := newFakeS3(t)
	s3.put("iris/model.bin", "weights")
	s3.put("iris/config.json", `{"a":1}`)
	remote := s3.resolve(t, "mys3:models/iris", secretKeyID)

	m, err := remote.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	rc, err := remote.Open(ctx, m[0])
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	// While a reader is open the remote is busy: its connection stays.
	time.Sleep(2 * connLinger)
	if s3.conns.Load() == 0 {
		t.Fatal("no connection open while a reader is: the test would prove nothing")
	}
	if _, err := io.ReadAll(rc); err != nil {
		t.Fatalf("reading: %v", err)
	}
	rc.Close()
	waitNoConns(t, s3, "after the last reader closed")

	if err := remote.Verify(ctx, m); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	waitNoConns(t, s3, "after Verify")
}

func waitNoConns(t *testing.T, s3 *fakeS3, when string) {
	t.Helper()
	deadline := time.Now().Add(10 * connLinger)
	for s3.conns.Load() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still open %s, %s later (the remote should close them %s after its last request)", s3.conns.Load(), when, 10*connLinger, connLinger)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
