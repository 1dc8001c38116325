package keymutex

import (
	"runtime"
	"testing"
	"time"
)

// TestKeyedMutexSerialisesSameKey: a second Lock of a held key waits until
// the first unlock.
func TestKeyedMutexSerialisesSameKey(t *testing.T) {
	var k Map
	unlock := k.Lock("/target/a")
	acquired := make(chan func())
	go func() { acquired <- k.Lock("/target/a") }()
	k.waitWaiters(t, "/target/a", 2)

	// Lock of a different key proceeds while the second waiter is blocked,
	// and the waiter is still blocked after it: the key is held.
	k.Lock("/target/b")()
	select {
	case u := <-acquired:
		u()
		t.Fatal("second Lock of a held key returned before the first unlock")
	default:
	}
	unlock()
	second := recv(t, acquired, "the second Lock after unlock")
	second()
	if n := k.Len(); n != 0 {
		t.Errorf("%d keys left after every lock was released", n)
	}
}

// TestKeyedMutexDifferentKeys: holding one key never blocks another.
func TestKeyedMutexDifferentKeys(t *testing.T) {
	var k Map
	unlockA := k.Lock("/target/a")
	defer unlockA()
	done := make(chan struct{})
	go func() {
		k.Lock("/target/b")()
		k.Lock("/target/c")()
		close(done)
	}()
	recv(t, done, "locks of other keys while one key is held")
}

// TestKeyedMutexNoOverlap: many goroutines on one key never overlap.
func TestKeyedMutexNoOverlap(t *testing.T) {
	var k Map
	const n = 32
	inside := 0
	overlap := make(chan struct{}, n)
	done := make(chan struct{}, n)
	start := make(chan struct{})
	for range n {
		go func() {
			<-start
			unlock := k.Lock("/target/a")
			inside++
			if inside != 1 {
				overlap <- struct{}{}
			}
			inside--
			unlock()
			done <- struct{}{}
		}()
	}
	close(start)
	for range n {
		recv(t, done, "lockers")
	}
	if len(overlap) != 0 {
		t.Fatal("two holders of one key at once")
	}
	if m := k.Len(); m != 0 {
		t.Errorf("%d keys left after every lock was released", m)
	}
}

// waitWaiters waits until key has n holders and waiters. It spins on the
// lock's own count instead of sleeping; the deadline is only a hang guard.
func (k *Map) waitWaiters(t *testing.T, key string, n int) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for {
		k.mu.Lock()
		got := 0
		if l := k.locks[key]; l != nil {
			got = l.waiters
		}
		k.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("key %s has %d holders and waiters, want %d", key, got, n)
		}
		runtime.Gosched()
	}
}

// recv waits for a value from ch with a hang guard.
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitLimit):
		t.Fatalf("timed out waiting for %s", what)
		var zero T
		return zero
	}
}

// waitLimit bounds every wait of a test that would otherwise hang.
const waitLimit = 10 * time.Second
