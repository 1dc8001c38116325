package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/units"
	"k8s.io/klog/v2"
)

// Fetcher opens one object of a model. source.Remote implements it.
type Fetcher interface {
	Open(ctx context.Context, e source.Entry) (io.ReadCloser, error)
}

// Progress counts the bytes of one running download.
type Progress struct {
	Total  int64
	done   atomic.Int64
	inodes int64        // the download takes at most, for the budget
	files  atomic.Int64 // files it has committed so far
}

// Done is the number of bytes ingested so far.
func (p *Progress) Done() int64 { return p.done.Load() }

// InProgressError says a download is still running when the caller stopped
// waiting. It is not a failure: asking again joins the same download.
type InProgressError struct {
	Done, Total int64
}

func (e *InProgressError) Error() string {
	pct := 0.0
	if e.Total > 0 {
		pct = 100 * float64(e.Done) / float64(e.Total)
	}
	return fmt.Sprintf("download still running: %s of %s (%.0f%%)", units.Bytes(e.Done), units.Bytes(e.Total), pct)
}

// Ensure returns the tree for a content key, downloading the manifest's
// files once however many callers ask at the same time. The download runs on
// the store's own context: when ctx ends first, Ensure returns an
// *InProgressError and the download goes on for the next caller to join.
// fetched says whether f downloaded the model for this answer; a caller
// that joined another caller's download gets false, since its own
// credentials were never used.
func (s *Store) Ensure(ctx context.Context, key string, m source.Manifest, f Fetcher) (t Tree, fetched bool, err error) {
	e, err := s.EnsureGated(ctx, key, m, f, nil)
	return e.Tree, e.Fetched, err
}

// Ensured is what EnsureGated did.
type Ensured struct {
	Tree Tree
	// Fetched: this caller's download committed the tree.
	Fetched bool
	// Joined: this caller waited for a download another caller started.
	// It needed a download, though its own fetcher read nothing. A caller
	// that found the tree committed has neither Fetched nor Joined.
	Joined bool
	// Reused is how many of the objects the download did not fetch because
	// this node already held them, unchanged, from an earlier download, and
	// that the request's credentials were not shown to read (files linked
	// by their sha256 after Verify are not counted: the cache need not ask
	// again).
	Reused int
	// Checks says how the downloaded objects were checked.
	Checks Checks
	// From says where the download's bytes came from (the origin, peers).
	From BytesFrom
}

// Checks counts how a download's objects were checked against the remote
// before their blobs were committed.
type Checks struct {
	MD5       int // against the MD5 the remote listed (ETag or stored MD5)
	Remote    int // against a checksum asked of the remote: S3's x-amz-checksum-*, a multipart ETag, GCS's crc32c
	Unchecked int // no checksum the remote keeps could be had: accepted as they came
}

// ObjectIndex is what an Index may also know: for every object this node
// downloaded, the blob its bytes became (source.ObjectKey). With it a new
// listing of a model links its unchanged objects from blobs/ instead of
// downloading them. pkg/state implements it.
type ObjectIndex interface {
	// LookupObjects returns the tree committed for a content key or, when
	// there is none, the blobs recorded for the given object keys, in one
	// read.
	LookupObjects(key string, objects []string) (t Tree, ok bool, blobs map[string]string, err error)
	// RecordTreeObjects records a tree, the blob each object became and
	// where the download's bytes came from.
	RecordTreeObjects(key string, t Tree, blobs map[string]string, from BytesFrom) error
	// RecordObject records the blob one object became, before its tree
	// exists (a large object, so that an interrupted download resumes).
	RecordObject(object, blob string) error
}

// Router is a Fetcher that reads some objects from elsewhere than the
// remote it lists: other nodes that hold them (docs/design.md "Peers").
// Route returns the Fetcher one object is read from and the sha256 its
// sender named ("" for the remote's own bytes); the store then checks the
// bytes against both the remote's checksum and that sha256. checked says
// whether the remote keeps a checksum of the object the store checks: an
// object whose bytes nothing from the remote checks is read from it.
type Router interface {
	Fetcher
	Route(ctx context.Context, e source.Entry, checked bool) (f Fetcher, sha256 string)
}

// route is the Fetcher of one object and the sha256 its sender named.
func route(ctx context.Context, f Fetcher, e source.Entry, checked bool) (Fetcher, string) {
	if r, ok := f.(Router); ok {
		return r.Route(ctx, e, checked)
	}
	return f, ""
}

// identified is a Fetcher that names its backend (source.Remote does).
type identified interface{ Identity() string }

// EnsureGated is Ensure with a gate: when this call starts a new download
// (not joins one, not finds the tree committed), gate runs first in the
// flight, once the download is registered (so Reservations count it) and
// before any object is opened; an error from it refuses the download. The
// caller makes room for the download there: the store decides nothing.
func (s *Store) EnsureGated(ctx context.Context, key string, m source.Manifest, f Fetcher, gate func() error) (Ensured, error) {
	if t, ok := s.lookup(key); ok {
		return Ensured{Tree: t}, nil
	}
	// Only the closure of the caller that starts the flight runs; its token
	// tells that caller apart from those who join.
	caller := new(int)
	// Every caller, the one that starts the download too, keeps it wanted
	// while it waits (the watchdog's grace).
	defer s.want(key)()
	ch := s.flights.DoChan(key, func() (any, error) { return s.fly(key, m, f, gate, caller) })
	select {
	case r := <-ch:
		if r.Err != nil {
			return Ensured{}, r.Err
		}
		fl := r.Val.(flight)
		// Joiners did not fetch: their credentials proved nothing.
		mine := fl.by == caller
		return Ensured{Tree: fl.tree, Fetched: fl.fetched && mine, Joined: fl.fetched && !mine, Reused: fl.reused, Checks: fl.checks, From: fl.from}, nil
	case <-ctx.Done():
		s.mu.Lock()
		p := s.running[key]
		s.mu.Unlock()
		if p == nil {
			return Ensured{}, &InProgressError{Total: m.Size()}
		}
		return Ensured{}, &InProgressError{Done: p.Done(), Total: p.Total}
	}
}

// fly is one flight for a content key, run by the caller that started it:
// the tree when a flight that finished meanwhile recorded it, else the
// gate, the download and its record.
func (s *Store) fly(key string, m source.Manifest, f Fetcher, gate func() error, caller *int) (flight, error) {
	objects, oi := s.objectKeys(m, f)
	// A flight that finished between lookup and DoChan recorded its tree.
	var reuse map[string]string
	if oi != nil {
		t, ok, blobs, err := oi.LookupObjects(key, objects)
		if err != nil {
			klog.ErrorS(err, "reading the object index; downloading every object", "key", key)
		}
		if ok && s.HasTree(t.Digest) {
			return flight{tree: t}, nil
		}
		reuse = blobs
	} else if t, ok := s.lookup(key); ok {
		return flight{tree: t}, nil
	}
	p := &Progress{Total: m.Size(), inodes: inodesOf(m)}
	unregister, err := s.register(key, p)
	if err != nil {
		return flight{}, err
	}
	defer unregister()
	if gate != nil {
		if err := gate(); err != nil {
			return flight{}, err
		}
	}
	fl, err := s.downloadAndRecord(key, m, f, p, objects, oi, reuse, caller)
	if fin, ok := f.(Finisher); ok {
		fin.DownloadFinished(err == nil)
	}
	return fl, err
}

// Finisher is a Fetcher told how the download it served ended, once its
// tree is recorded or the download failed; the callers that started or
// joined it may have returned long before.
type Finisher interface {
	DownloadFinished(committed bool)
}

// downloadAndRecord downloads a flight's tree and records it in the index.
func (s *Store) downloadAndRecord(key string, m source.Manifest, f Fetcher, p *Progress, objects []string, oi ObjectIndex, reuse map[string]string, caller *int) (flight, error) {
	t, in, err := s.download(key, m, f, p, objects, reuse)
	if err != nil {
		return flight{}, err
	}
	if in.checks.Unchecked > 0 && s.onUnchecked != nil {
		s.onUnchecked(in.checks.Unchecked)
	}
	if oi != nil {
		blobs := map[string]string{}
		for i, k := range objects {
			if k != "" {
				blobs[k] = in.sums[i]
			}
		}
		err = oi.RecordTreeObjects(key, t, blobs, in.from)
	} else {
		err = s.index.RecordTree(key, t)
	}
	if err != nil {
		return flight{}, fmt.Errorf("recording tree %s: %w", t.Digest, err)
	}
	return flight{tree: t, fetched: true, by: caller, reused: in.reused, checks: in.checks, from: in.from}, nil
}

// objectKeys names a manifest's objects (source.ObjectKey) and returns the
// object index, nil when the index or the fetcher cannot serve one. They
// are worked out by the one caller that may download, not by every caller
// that joins; they name partial downloads too, so they do not need an index.
func (s *Store) objectKeys(m source.Manifest, f Fetcher) ([]string, ObjectIndex) {
	oi, _ := s.index.(ObjectIndex)
	objects := make([]string, len(m))
	id, ok := f.(identified)
	if !ok {
		return objects, nil
	}
	for i, e := range m {
		objects[i] = source.ObjectKey(id.Identity(), e)
	}
	return objects, oi
}

// register makes a download of key visible (Downloading, Reservations, the
// watchdog's wants) and counted by Close; unregister undoes it.
func (s *Store) register(key string, p *Progress) (unregister func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ctx.Err(); err != nil {
		// Close has begun: a WaitGroup must not grow while Close waits on it.
		return nil, fmt.Errorf("the model store is shutting down: %w", err)
	}
	s.running[key] = p
	if s.wants[key] == nil {
		// Its caller stopped waiting already.
		s.wants[key] = &wanted{since: time.Now()}
	}
	s.wg.Add(1)
	return func() {
		s.mu.Lock()
		delete(s.running, key)
		if w := s.wants[key]; w != nil && w.n == 0 {
			delete(s.wants, key)
		}
		s.mu.Unlock()
		s.wg.Done()
	}, nil
}

// download ingests a registered download on its own context: the node's
// bounds share their slots out by it, and the watchdog ends it.
func (s *Store) download(key string, m source.Manifest, f Fetcher, p *Progress, objects []string, reuse map[string]string) (_ Tree, _ ingested, err error) {
	if s.onDownload != nil {
		done := s.onDownload()
		defer func() { done(p.Done(), err) }()
	}
	d := &download{key: key, p: p}
	dctx, cancel := context.WithCancelCause(s.withConns(withDownload(s.ctx, d)))
	defer cancel(nil)
	s.conns.join(d)
	defer s.conns.leave(d)
	defer s.watch(d, cancel)()
	t, in, err := s.ingest(dctx, m, f, p, objects, reuse)
	in.from = d.from.snapshot()
	if err != nil {
		if cause := context.Cause(dctx); cause != nil && s.ctx.Err() == nil {
			// Cut by the watchdog: say why, not "context canceled".
			return Tree{}, in, fmt.Errorf("downloading %s: %w", units.Bytes(m.Size()), cause)
		}
		return Tree{}, in, err
	}
	return t, in, nil
}

// Cached returns the committed tree for a content key, if any.
func (s *Store) Cached(key string) (Tree, bool) { return s.lookup(key) }

// flight is what one download hands to everyone who joined it.
type flight struct {
	tree    Tree
	fetched bool
	by      *int // the starting caller's token: its credentials downloaded it
	reused  int  // objects linked from blobs/ unchecked for these credentials (object index)
	checks  Checks
	from    BytesFrom
}

// lookup finds a committed tree for key; an index error or a missing tree
// counts as absent, which costs a download, never a wrong answer.
func (s *Store) lookup(key string) (Tree, bool) {
	t, ok, err := s.index.TreeForKey(key)
	if err != nil {
		klog.ErrorS(err, "reading content key index; treating as not cached", "key", key)
		return Tree{}, false
	}
	if !ok || !s.HasTree(t.Digest) {
		return Tree{}, false
	}
	return t, true
}

// Downloading reports the progress of a running download for key, if any.
func (s *Store) Downloading(key string) (*Progress, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.running[key]
	return p, ok
}

// IsInProgress reports whether err says a download is still running.
func IsInProgress(err error) bool {
	var e *InProgressError
	return errors.As(err, &e)
}
