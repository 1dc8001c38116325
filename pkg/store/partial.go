package store

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"k8s.io/klog/v2"
)

// PartialDir holds large files whose download stopped part way, kept
// across restarts so that the next download of the same object resumes
// (docs/design.md "Resume"). Nothing in it is ever visible to a pod; its
// bytes count as ingest in Usage.
const PartialDir = "partial"

// partialMaxAge is how long a partial file no download resumed is kept.
const partialMaxAge = 24 * time.Hour

// checkpointSuffix names the file that records what of a partial file is
// durable, written after an fsync of those bytes: "<bytes>\n", the hashed
// prefix, then "<chunk size> <index> ...\n", the chunks past it that were
// written too (they came in while an earlier chunk was still in flight).
const checkpointSuffix = ".at"

// partialFile is the file one ranged download writes into: a partial
// file that may resume an earlier download, or (for an object without a
// key, or one another download is writing) a plain file in the ingest
// directory.
type partialFile struct {
	s       *Store
	f       *os.File
	name    string // where the file is
	ingest  string // the ingest file it becomes before its blob is committed
	hash    string // busy-map key; "" for a plain file
	durable int64  // the prefix recorded as written by an earlier download
	chunk   int64

	// onDisk: chunks past the prefix an earlier download recorded (read
	// only); written: chunks past the prefix this download or an earlier
	// one wrote, recorded by the next checkpoint.
	onDisk  map[int]bool
	mu      sync.Mutex
	written map[int]bool
}

// openPartial opens the file an object downloads into. Only the object's
// own key finds a partial file: the key names the object at its remote
// with its size and checksum, so an object that changed is a new file.
func (s *Store) openPartial(ingest string, e source.Entry, objectKey string, chunk int64) (*partialFile, error) {
	pf := &partialFile{s: s, name: ingest, ingest: ingest, chunk: chunk, onDisk: map[int]bool{}, written: map[int]bool{}}
	if objectKey != "" {
		h := sha256.Sum256([]byte(objectKey))
		pf.hash = hex.EncodeToString(h[:16])
		s.partialMu.Lock()
		if s.partialBusy[pf.hash] {
			pf.hash = "" // the same object in two downloads: the second gets its own file
		} else {
			s.partialBusy[pf.hash] = true
			pf.name = path.Join(PartialDir, pf.hash)
		}
		s.partialMu.Unlock()
	}
	if pf.hash != "" {
		var recChunk int64
		var chunks []int
		pf.durable, recChunk, chunks = s.readCheckpoint(pf.name)
		f, err := s.root.OpenFile(pf.name, os.O_RDWR, 0)
		if err == nil && (pf.durable > 0 || len(chunks) > 0) {
			if fi, err := f.Stat(); err == nil && fi.Size() == e.Size && pf.durable <= e.Size {
				if recChunk == chunk {
					for _, i := range chunks {
						if int64(i)*chunk >= pf.durable && int64(i)*chunk < e.Size {
							pf.onDisk[i], pf.written[i] = true, true
						}
					}
				}
				pf.f = f
				return pf, nil
			}
		}
		if f != nil {
			f.Close()
		}
		pf.durable = 0
		_ = s.root.Remove(pf.name + checkpointSuffix)
	}
	f, err := s.root.OpenFile(pf.name, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		pf.release()
		return nil, noSpace(fmt.Errorf("creating ingest file: %w", err))
	}
	if err := f.Truncate(e.Size); err != nil {
		f.Close()
		pf.release()
		return nil, noSpace(fmt.Errorf("sizing %s: %w", e.Path, err))
	}
	pf.f = f
	return pf, nil
}

// resumeAt is where the download goes on: the durable prefix, rounded down
// to whole chunks.
func (pf *partialFile) resumeAt(chunk int64) int64 { return pf.durable / chunk * chunk }

// onDiskChunk reports whether chunk i is on disk from an earlier download.
func (pf *partialFile) onDiskChunk(i int) bool { return pf.onDisk[i] }

// markWritten notes that chunk i is in the file, for the next checkpoint.
func (pf *partialFile) markWritten(i int) {
	pf.mu.Lock()
	pf.written[i] = true
	pf.mu.Unlock()
}

// checkpoint makes the first n bytes and the chunks written past them
// durable, and records them. The data is synced before the record, and
// the chunks are listed from before the sync, so a record never claims
// bytes a crash lost.
func (pf *partialFile) checkpoint(n int64) error {
	if pf.hash == "" {
		return nil
	}
	pf.mu.Lock()
	var past []int
	for i := range pf.written {
		if int64(i)*pf.chunk >= n {
			past = append(past, i)
		}
	}
	pf.mu.Unlock()
	slices.Sort(past)
	if err := pf.f.Sync(); err != nil {
		return noSpace(fmt.Errorf("syncing a partial download: %w", err))
	}
	var rec strings.Builder
	fmt.Fprintf(&rec, "%d\n%d", n, pf.chunk)
	for _, i := range past {
		fmt.Fprintf(&rec, " %d", i)
	}
	rec.WriteString("\n")
	tmp := pf.name + checkpointSuffix + ".tmp"
	if err := pf.s.root.WriteFile(tmp, []byte(rec.String()), 0o600); err != nil {
		return noSpace(fmt.Errorf("recording a partial download: %w", err))
	}
	if err := pf.s.root.Rename(tmp, pf.name+checkpointSuffix); err != nil {
		return fmt.Errorf("recording a partial download: %w", err)
	}
	pf.durable = n
	return nil
}

// finish moves a complete partial file into the ingest directory, where
// its blob is committed from and which is removed whatever happens next.
func (pf *partialFile) finish() error {
	if pf.hash == "" {
		return nil
	}
	if err := pf.s.root.Rename(pf.name, pf.ingest); err != nil {
		return fmt.Errorf("moving a finished download: %w", err)
	}
	_ = pf.s.root.Remove(pf.name + checkpointSuffix)
	pf.name = pf.ingest
	pf.release()
	return nil
}

// drop removes a partial file whose bytes are of no use (the object
// changed or is gone at the remote).
func (pf *partialFile) drop() {
	if pf.hash == "" {
		return
	}
	_ = pf.s.root.Remove(pf.name + checkpointSuffix)
	_ = pf.s.root.Remove(pf.name)
}

func (pf *partialFile) close() {
	pf.f.Close()
	pf.release()
}

func (pf *partialFile) release() {
	if pf.hash == "" {
		return
	}
	pf.s.partialMu.Lock()
	delete(pf.s.partialBusy, pf.hash)
	pf.s.partialMu.Unlock()
	pf.hash = ""
}

// readCheckpoint returns what a partial file's record says is durable:
// the prefix, and the chunk size and chunks past it. A record that does
// not parse (a crash while writing it) says nothing is.
func (s *Store) readCheckpoint(name string) (prefix, chunk int64, chunks []int) {
	b, err := fs.ReadFile(s.root.FS(), name+checkpointSuffix)
	if err != nil {
		return 0, 0, nil
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	prefix, err = strconv.ParseInt(lines[0], 10, 64)
	if err != nil || prefix < 0 {
		return 0, 0, nil
	}
	if len(lines) < 2 {
		return prefix, 0, nil
	}
	fields := strings.Fields(lines[1])
	if len(fields) == 0 {
		return prefix, 0, nil
	}
	if chunk, err = strconv.ParseInt(fields[0], 10, 64); err != nil || chunk <= 0 {
		return prefix, 0, nil
	}
	for _, f := range fields[1:] {
		i, err := strconv.Atoi(f)
		if err != nil || i < 0 {
			return prefix, 0, nil
		}
		chunks = append(chunks, i)
	}
	return prefix, chunk, chunks
}

// DropPartials removes every partial file no download is writing, or only
// those untouched for maxAge when maxAge > 0. It returns the bytes freed.
func (s *Store) DropPartials(maxAge time.Duration) (int64, error) {
	des, err := fs.ReadDir(s.root.FS(), PartialDir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading %s: %w", PartialDir, err)
	}
	var freed int64
	for _, d := range des {
		base, _, _ := strings.Cut(d.Name(), ".")
		s.partialMu.Lock()
		busy := s.partialBusy[base]
		s.partialMu.Unlock()
		fi, err := d.Info()
		if busy || err != nil {
			continue
		}
		_, derr := s.root.Lstat(path.Join(PartialDir, base))
		useless := strings.HasSuffix(d.Name(), ".tmp") || errors.Is(derr, fs.ErrNotExist) // a record without its file
		if !useless && maxAge > 0 && time.Since(fi.ModTime()) <= maxAge {
			continue
		}
		if err := s.root.Remove(path.Join(PartialDir, d.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return freed, fmt.Errorf("removing a partial download: %w", err)
		}
		freed += fi.Size()
	}
	if freed > 0 {
		klog.InfoS("partial downloads removed", "bytes", freed)
	}
	return freed, nil
}
