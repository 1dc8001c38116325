// Package mount publishes trees into pods: a bind mount remounted
// ro,nosuid,nodev, behind a small interface so node logic is unit-tested
// with a fake and integration-tested with real kernel mounts.
package mount

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	mountutils "k8s.io/mount-utils"
)

// Options applied to every published target (invariant 6).
var publishOptions = []string{"bind", "ro", "nosuid", "nodev"}

// Mounter binds trees to targets.
type Mounter interface {
	// BindReadOnly creates target if needed and bind-mounts source there
	// read-only, nosuid, nodev.
	BindReadOnly(source, target string) error
	// MountedFrom reports whether target is a live mount of source.
	MountedFrom(target, source string) (bool, error)
	// Unpublish unmounts target if it is mounted and removes the directory.
	// A target that does not exist is not an error.
	Unpublish(target string) error
}

// Kernel mounts through k8s.io/mount-utils.
type Kernel struct {
	m *mountutils.Mounter
}

// NewKernel returns a Mounter that makes real mounts.
func NewKernel() *Kernel {
	return &Kernel{m: mountutils.New("").(*mountutils.Mounter)}
}

// BindReadOnly implements Mounter.
func (k *Kernel) BindReadOnly(source, target string) error {
	if err := os.MkdirAll(target, 0o750); err != nil {
		return fmt.Errorf("creating target directory: %w", err)
	}
	// Without systemd: a node plugin in a container has no systemd to ask,
	// and a scope unit would outlive nothing we need.
	if err := k.m.MountSensitiveWithoutSystemd(source, target, "", publishOptions, nil); err != nil {
		return fmt.Errorf("bind-mounting %s at %s: %w", source, target, err)
	}
	return nil
}

// MountedFrom implements Mounter. A bind mount of a directory on the same
// filesystem shares its device, so mountinfo says whether target is a mount
// point and the inode says whose.
func (k *Kernel) MountedFrom(target, source string) (bool, error) {
	mnt, err := k.m.IsMountPoint(target)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		if mountutils.IsCorruptedMnt(err) {
			return false, nil
		}
		return false, fmt.Errorf("checking mount at %s: %w", target, err)
	}
	if !mnt {
		return false, nil
	}
	return sameInode(target, source)
}

// Unpublish implements Mounter.
func (k *Kernel) Unpublish(target string) error {
	if err := mountutils.CleanupMountPoint(target, k.m, true); err != nil {
		return fmt.Errorf("unmounting %s: %w", target, err)
	}
	return nil
}

func sameInode(a, b string) (bool, error) {
	var sa, sb syscall.Stat_t
	if err := syscall.Stat(a, &sa); err != nil {
		return false, nil
	}
	if err := syscall.Stat(b, &sb); err != nil {
		return false, nil
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}
