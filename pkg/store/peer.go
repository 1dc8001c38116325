package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"

	"golang.org/x/sys/unix"
)

// OpenBlob opens a committed blob read-only for serving it to a peer
// (pkg/peer's Blobs). It opens relative to the held blobs/ descriptor and
// never through a link: a blob is a regular file in blobs/ or it is not
// there, which is an error wrapping fs.ErrNotExist (the peer answers 404
// and the requester asks elsewhere).
func (s *Store) OpenBlob(sum string) (*os.File, error) {
	var f *os.File
	err := s.atBlob(sum, func(dirfd int) error {
		// O_NONBLOCK: opening a FIFO someone put there must not hang.
		fd, err := unix.Openat(dirfd, sum, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return err
		}
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			unix.Close(fd)
			return fmt.Errorf("blob %s is not a regular file: %w", sum, fs.ErrNotExist)
		}
		if err := unix.SetNonblock(fd, false); err != nil {
			unix.Close(fd)
			return err
		}
		f = os.NewFile(uintptr(fd), path.Join(s.dir, BlobsDir, sum))
		return nil
	})
	switch {
	case err == nil:
		return f, nil
	case errors.Is(err, unix.ELOOP):
		// O_NOFOLLOW met a link.
		return nil, fmt.Errorf("blob %s is a link: %w", sum, fs.ErrNotExist)
	}
	return nil, fmt.Errorf("opening blob %s: %w", sum, err)
}
