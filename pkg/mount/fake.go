package mount

import (
	"fmt"
	"os"
	"sync"
)

// Fake records mounts in memory and creates and removes target directories
// like the real one, for unit tests without root.
type Fake struct {
	mu     sync.Mutex
	mounts map[string]string // target → source
	// FailBind, when set, is returned by the next BindReadOnly.
	FailBind error
}

// NewFake returns an empty Fake.
func NewFake() *Fake { return &Fake{mounts: map[string]string{}} }

// BindReadOnly implements Mounter.
func (f *Fake) BindReadOnly(source, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.FailBind; err != nil {
		f.FailBind = nil
		return err
	}
	if _, err := os.Stat(source); err != nil {
		return fmt.Errorf("bind source: %w", err)
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return err
	}
	f.mounts[target] = source
	return nil
}

// MountedFrom implements Mounter.
func (f *Fake) MountedFrom(target, source string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mounts[target] == source, nil
}

// Unpublish implements Mounter.
func (f *Fake) Unpublish(target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.mounts, target)
	if err := os.Remove(target); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// Mounts returns a copy of the current target → source map.
func (f *Fake) Mounts() map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]string, len(f.mounts))
	for k, v := range f.mounts {
		out[k] = v
	}
	return out
}

// Forget drops a mount as a reboot would, leaving the directory.
func (f *Fake) Forget(target string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.mounts, target)
}
