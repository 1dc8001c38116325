// Package mount publishes trees into pods: a bind mount that is
// ro,nosuid,nodev before it is attached, behind a small interface so node
// logic is unit-tested with a fake and integration-tested with real kernel
// mounts.
package mount

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
	mountutils "k8s.io/mount-utils"
)

// publishAttrs are the per-mount flags of every published target (the
// "read-only everywhere" invariant in docs/design.md).
const publishAttrs = unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV

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
//
// The mount is built detached and made read-only before it is attached:
// open_tree(OPEN_TREE_CLONE) → mount_setattr → move_mount. A bind followed
// by a remount,ro is not enough: in the DaemonSet the plugin has its own
// mount namespace and kubelet's pods directory is Bidirectional, so the bind
// propagates to the host while the remount's per-mount flags never do, and
// the host (where kubelet and the runtime see the target) gets a writable
// mount of the shared tree. A mount that is read-only when it is attached is
// copied with its flags into every peer, with no window in which it is
// writable. See "Read-only everywhere" in docs/design.md.
func (k *Kernel) BindReadOnly(source, target string) error {
	if err := os.MkdirAll(target, 0o750); err != nil {
		return fmt.Errorf("creating target directory: %w", err)
	}
	fd, err := detachedReadOnlyClone(source)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attaching the read-only mount of %s at %s: %w", source, target, err)
	}
	return nil
}

// detachedReadOnlyClone returns a file descriptor of a new, detached bind
// mount of source whose flags are already ro,nosuid,nodev. Closing the
// descriptor without attaching it discards the mount.
func detachedReadOnlyClone(source string) (int, error) {
	fd, err := unix.OpenTree(unix.AT_FDCWD, source, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("cloning %s for a bind mount: %w", source, err)
	}
	attr := unix.MountAttr{Attr_set: publishAttrs}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("making the bind mount of %s read-only: %w", source, err)
	}
	return fd, nil
}

// CheckSupport reports whether this kernel and this process can build
// read-only mounts the way BindReadOnly does (Linux 5.12 or later, and
// CAP_SYS_ADMIN), by building one of dir and discarding it. The driver calls
// it at start so that a node that cannot publish safely says so at once
// instead of failing every publish.
func CheckSupport(dir string) error {
	fd, err := detachedReadOnlyClone(dir)
	if err != nil {
		if errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("this kernel has no mount_setattr (Linux 5.12 or later is needed to create read-only mounts atomically): %w", err)
		}
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("no permission to create mounts (the node plugin must run privileged, with CAP_SYS_ADMIN): %w", err)
		}
		return err
	}
	return unix.Close(fd)
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
