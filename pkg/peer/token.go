package peer

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// FileTokenSource reads the projected service-account token kubelet keeps
// in a file, and reads it again when the file changes: kubelet rotates the
// token (at 80% of its life) by swapping the projected volume's ..data
// link, which a stat of the path sees as another inode.
type FileTokenSource struct {
	Path string

	mu    sync.Mutex
	stamp fileStamp
	token string
}

// fileStamp tells one version of a file from another.
type fileStamp struct {
	dev, ino uint64
	size     int64
	mtime    time.Time
}

// maxTokenFile bounds what is read from the token file.
const maxTokenFile = maxTokenBytes

// Token implements TokenSource. The error never holds the token.
func (f *FileTokenSource) Token() (string, error) {
	fi, err := os.Stat(f.Path)
	if err != nil {
		return "", fmt.Errorf("peer token: %w", err)
	}
	st := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if s, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.dev, st.ino = uint64(s.Dev), s.Ino
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.token != "" && st == f.stamp {
		return f.token, nil
	}
	if st.size > maxTokenFile {
		return "", fmt.Errorf("peer token %s: %d bytes, more than a token", f.Path, st.size)
	}
	b, err := os.ReadFile(f.Path)
	if err != nil {
		return "", fmt.Errorf("peer token: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", errors.New("peer token " + f.Path + " is empty")
	}
	f.stamp, f.token = st, token
	return token, nil
}
