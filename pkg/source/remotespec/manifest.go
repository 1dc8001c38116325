package remotespec

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
	// Version names this version of an object listed without an MD5, as
	// the remote does without a request per object: "etag:<hex>-<parts>"
	// for an S3 object uploaded in parts (or any S3 ETag that is no MD5),
	// "generation:<n>" for GCS. "" when the listing gave neither.
	Version string
	// SHA256 is the object's sha256 in lower-case hex when the source
	// names it before the download (a Hub LFS oid, an OCI layer digest of
	// a raw layer): the store checks the bytes against it and links a blob
	// it already holds instead of fetching it again. "" for object stores.
	SHA256 string
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
		fmt.Fprintf(h, "%s\x00%d\x00%s\x00%d", e.Path, e.Size, e.Hash, e.ModTime.UnixNano())
		// Only when named, so that object-store keys stay what they were.
		if e.SHA256 != "" {
			fmt.Fprintf(h, "\x00sha256:%s", e.SHA256)
		}
		// An entry listed without a time (a Hub file, named by its git
		// oid) has only its version to tell one content from another;
		// object stores list a time, and their keys stay what they were.
		if e.Version != "" && e.ModTime.IsZero() {
			fmt.Fprintf(h, "\x00version:%s", e.Version)
		}
		h.Write([]byte{'\n'})
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// CheckManifest sorts m and rejects keys that cannot all exist in one tree:
// unsafe paths, duplicates, keys equal under case folding (one file on a
// case-insensitive filesystem, and a way to confuse a reader), a file that
// is also a directory (exactly or under case folding), unknown sizes.
func CheckManifest(m Manifest) (Manifest, error) {
	slices.SortFunc(m, func(a, b Entry) int { return strings.Compare(a.Path, b.Path) })
	files := make(map[string]string, len(m)) // folded path → path
	dirs := map[string]string{}              // folded directory → directory
	exactDirs := map[string]bool{}
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
		fp := foldPath(e.Path)
		if other, ok := files[fp]; ok {
			return nil, fmt.Errorf("%w: objects %q and %q differ only in case", ErrUnsafePath, other, e.Path)
		}
		files[fp] = e.Path
		// A directory seen before means its parents were seen too.
		for d := path.Dir(e.Path); d != "." && !exactDirs[d]; d = path.Dir(d) {
			exactDirs[d] = true
			if fd := foldPath(d); dirs[fd] == "" {
				dirs[fd] = d
			}
		}
	}
	for _, e := range m {
		d, ok := dirs[foldPath(e.Path)]
		switch {
		case exactDirs[e.Path]:
			return nil, fmt.Errorf("%w: %q is both an object and a directory prefix", ErrUnsafePath, e.Path)
		case ok:
			return nil, fmt.Errorf("%w: object %q and directory %q differ only in case", ErrUnsafePath, e.Path, d)
		}
	}
	return m, nil
}

// ObjectKey names one listed object as this node downloaded it: the backend
// identity (type, endpoint, region, bucket and prefix), the object's key,
// size, checksum and modification time. Two listings give the same key only
// for the same object unchanged, so its blob can be reused without a
// download and its partial download resumed; never by checksum alone, nor
// across objects. An object listed without an MD5 is named by its Version
// instead (the ETag of an upload in parts, a GCS generation), in a format
// of its own so that it never equals an MD5-named key. An object listed
// with neither gets "" and is always downloaded in full.
func ObjectKey(identity string, e Entry) string {
	h := sha256.New()
	switch {
	case e.Hash != "":
		fmt.Fprintf(h, "modelcache object v1\x00%s\x00%s\x00%d\x00%s\x00%d", identity, e.Path, e.Size, e.Hash, e.ModTime.UnixNano())
	case e.Version != "":
		fmt.Fprintf(h, "modelcache object v2 version\x00%s\x00%s\x00%d\x00%s\x00%d", identity, e.Path, e.Size, e.Version, e.ModTime.UnixNano())
	default:
		return ""
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}
