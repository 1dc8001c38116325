package source

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"
)

// Entry is one object of a model as the remote lists it.
type Entry struct {
	Path    string    // relative to the model root, validated by ValidateKey
	Size    int64     // bytes
	Hash    string    // remote checksum (S3 ETag/MD5) when the remote has one without extra requests
	ModTime time.Time // remote modification time
}

// Manifest is a model's listing, sorted by path. Two equal manifests from
// the same backend identity describe the same bytes.
type Manifest []Entry

// Size is the sum of the entries' sizes.
func (m Manifest) Size() int64 {
	var n int64
	for _, e := range m {
		n += e.Size
	}
	return n
}

// ContentKey names what a listing promises: the backend identity and every
// entry's path, size, checksum and time. A changed object changes the key, so
// pullPolicy=Always picks it up, and equal keys can share one download.
func ContentKey(identity string, m Manifest) string {
	h := sha256.New()
	fmt.Fprintf(h, "modelcache content key v1\x00%s\x00", identity)
	for _, e := range m {
		fmt.Fprintf(h, "%s\x00%d\x00%s\x00%d\n", e.Path, e.Size, e.Hash, e.ModTime.UnixNano())
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// checkManifest sorts m and rejects keys that cannot all exist in one tree:
// unsafe paths, duplicates, a file that is also a directory, unknown sizes.
func checkManifest(m Manifest) (Manifest, error) {
	slices.SortFunc(m, func(a, b Entry) int { return strings.Compare(a.Path, b.Path) })
	dirs := map[string]bool{}
	for i, e := range m {
		if err := ValidateKey(e.Path); err != nil {
			return nil, err
		}
		if e.Size < 0 {
			return nil, fmt.Errorf("%w: object %q has no known size and cannot be verified", ErrInvalid, e.Path)
		}
		if i > 0 && m[i-1].Path == e.Path {
			return nil, fmt.Errorf("%w: object %q is listed twice", ErrUnsafePath, e.Path)
		}
		for d := path.Dir(e.Path); d != "."; d = path.Dir(d) {
			if dirs[d] {
				break
			}
			dirs[d] = true
		}
	}
	for _, e := range m {
		if dirs[e.Path] {
			return nil, fmt.Errorf("%w: %q is both an object and a directory prefix", ErrUnsafePath, e.Path)
		}
	}
	return m, nil
}
