package cache

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/units"
	"k8s.io/klog/v2"
)

// Observer hears what one Fetch does, for pod events or a prefetch's
// progress lines. Its methods may be called from another goroutine.
type Observer interface {
	// Resolved: the modelUri's movable version (a Hub branch, an OCI tag)
	// is this revision (a commit, a manifest digest). Called before Hit or
	// Started when the source has one; never for object stores.
	Resolved(revision string)
	// Hit: the tree was served from the cache.
	Hit(t store.Tree)
	// Started: this fetch starts a download of total bytes.
	Started(total int64)
	// Progress of the download this fetch waits for (its own or joined).
	Progress(done, total int64, rate float64)
	// Finished: the download this fetch started, or waited for, committed
	// t, its objects checked as checks says, its bytes read from where
	// from says.
	Finished(t store.Tree, took time.Duration, checks store.Checks, from store.BytesFrom)
	// Failed: the download failed (not "still running").
	Failed(err error)
}

// FetchRequest is one request for a model.
type FetchRequest struct {
	URI    string
	Remote source.Remote
	// Policy is PullIfNotPresent (or ""), PullAlways or PullNever.
	Policy string
	// Digest, when set, pins the model's content digest.
	Digest string
	// Observer may be nil.
	Observer Observer
}

// Fetched is the tree a Fetch resolved to.
type Fetched struct {
	Tree store.Tree
	// Hit: the tree was committed before this request, which needed no
	// download. A request that waited for another's download is no hit.
	Hit bool
	// Joined: the request waited for a download another request started.
	Joined bool
	// Revision is what a Hub or OCI modelUri resolved to (source.Pinned).
	Revision string
	// sourceKey names the request's credentials and model when they were
	// checked by this fetch, so that the next fetch with them is a hit;
	// "" when there is nothing new to record.
	sourceKey string
	uri       string
}

// Fetch finds or downloads the model for a request, once per content key
// per node however many ask (the "one download per key" invariant): the
// source index for credentials checked before, else a listing, the content
// key, the drain gate (taken in the same step that starts a download, so a
// drained node never starts one), the download or a join of one running,
// and the credential check a cache hit needs (the "authorized cache hits"
// invariant). A caller whose context ends first gets a
// *store.InProgressError; the download goes on.
func (c *Cache) Fetch(ctx context.Context, req FetchRequest) (Fetched, error) {
	obs := req.Observer
	if obs == nil {
		obs = nopObserver{}
	}
	sourceKey := source.SourceKey(req.Remote)
	if req.Policy != PullAlways {
		if f, done, err := c.fetchChecked(sourceKey, req, obs); done {
			return f, err
		}
	}
	m, err := req.Remote.List(ctx)
	if err != nil {
		return Fetched{}, err
	}
	var rev string
	if p, ok := req.Remote.(source.Pinned); ok && p.Revision() != "" {
		rev = p.Revision()
		obs.Resolved(rev)
	}
	key := source.ContentKey(req.Remote.Identity(), m)
	stop := c.reportProgress(obs, key)
	start := time.Now()
	ens, err := c.ensure(ctx, key, m, req.Remote, obs)
	t, fetched := ens.Tree, ens.Fetched
	stop()
	switch {
	case store.IsInProgress(err):
		// Not a failure: the next request joins and reports on.
		return Fetched{}, err
	case err != nil:
		obs.Failed(err)
		return Fetched{}, err
	case fetched:
		if ens.Checks.Unchecked > 0 {
			klog.InfoS("objects the remote keeps no checksum for were accepted unchecked", "model", req.URI, "objects", ens.Checks.Unchecked, "checkedMD5", ens.Checks.MD5, "checkedRemote", ens.Checks.Remote)
		}
		obs.Finished(t, time.Since(start), ens.Checks, ens.From)
	case ens.Joined:
		// It waited for another's download: a download all the same.
		obs.Finished(t, time.Since(start), ens.Checks, ens.From)
	}
	if req.Digest != "" && t.Digest != req.Digest {
		return Fetched{}, mismatch(req.Digest, t.Digest)
	}
	res := Fetched{Tree: t, Hit: !fetched && !ens.Joined, Joined: ens.Joined, Revision: rev, uri: req.URI}
	switch {
	case fetched && ens.Reused == 0:
		res.sourceKey = sourceKey
	case c.verifyCredentials != VerifyNever:
		// The tree came from the cache or from another request's
		// download, or some of its objects were linked from earlier
		// downloads: these credentials have not read all of it. Stat
		// every object with them before anything is served.
		if err := req.Remote.Verify(ctx, m); err != nil {
			return Fetched{}, fmt.Errorf("checking this request's credentials against the cached model: %w", err)
		}
		res.sourceKey = sourceKey
	}
	// With VerifyNever nothing checked these credentials: nothing is
	// recorded, and the next fetch lists the remote again.
	if res.Hit {
		// Found committed after listing the remote (new credentials, or
		// pullPolicy Always), and these credentials may read it: a hit
		// like one the source index finds.
		obs.Hit(t)
	}
	return res, nil
}

// ensure downloads or joins the download of a content key, through the
// nodes that hold it when there are peers. Bytes a peer sent that fail
// the remote's checksum fail the download; it runs again once from the
// origin, its peers demoted.
func (c *Cache) ensure(ctx context.Context, key string, m source.Manifest, r source.Remote, obs Observer) (store.Ensured, error) {
	pf := c.peerFetch(r, key)
	if pf == nil {
		return c.store.EnsureGated(ctx, key, m, r, c.gate(obs, m))
	}
	ens, err := c.store.EnsureGated(ctx, key, m, pf, c.gate(obs, m))
	if errors.Is(err, source.ErrCorrupt) && pf.servedByPeers() {
		klog.InfoS("bytes from a peer failed the remote's checksum; downloading from the origin", "key", key, "err", err)
		pf = c.peerFetch(r, key)
		pf.origin = true
		return c.store.EnsureGated(ctx, key, m, pf, c.gate(obs, m))
	}
	return ens, err
}

// fetchChecked answers a request from the source index, without a call to
// the remote, when these credentials were checked for the model before;
// done is false when the remote must be listed.
func (c *Cache) fetchChecked(sourceKey string, req FetchRequest, obs Observer) (f Fetched, done bool, err error) {
	t, rev, ok := c.checkedTree(sourceKey)
	switch {
	case ok && (req.Digest == "" || req.Digest == t.Digest):
		// The record keeps the time of that check, not of this use. A Hub
		// or OCI model stays at the revision it resolved to then until a
		// publish lists it again (pullPolicy Always).
		if rev != "" {
			obs.Resolved(rev)
		}
		obs.Hit(t)
		return Fetched{Tree: t, Hit: true, Revision: rev}, true, nil
	case ok && req.Policy == PullNever:
		return Fetched{}, true, mismatch(req.Digest, t.Digest)
	case req.Policy == PullNever:
		return Fetched{}, true, ErrNotCached
	}
	return Fetched{}, false, nil
}

// gate runs in the flight of a new download, before anything is opened:
// a drained node serves what it has and lets a running download be
// joined, but starts none; otherwise room is made for the download,
// registered by then so the running downloads' reservations count it.
func (c *Cache) gate(obs Observer, m source.Manifest) func() error {
	return func() error {
		if drained, err := c.state.Drained(); err != nil || drained {
			return errors.Join(ErrDrained, err)
		}
		obs.Started(m.Size())
		if _, err := c.budget.makeRoom(0, false); err != nil {
			return fmt.Errorf("making room for %s: %w", units.Bytes(m.Size()), err)
		}
		return nil
	}
}

// Prefetch warms the cache through the same fetch as a publish, then
// records the model's source without a mount, so that the next fetch with
// the same credentials is a hit.
func (c *Cache) Prefetch(ctx context.Context, req FetchRequest) (Fetched, error) {
	f, err := c.Fetch(ctx, req)
	if err != nil || f.sourceKey == "" {
		return f, err
	}
	return f, c.state.RecordSource(f.sourceKey, state.Source{Tree: f.Tree.Digest, URI: f.uri, Revision: f.Revision, Checked: time.Now()})
}

// checkedTree returns the tree these credentials were checked for before,
// if it is still on disk and the check is recent enough for the policy.
func (c *Cache) checkedTree(sourceKey string) (t store.Tree, revision string, ok bool) {
	if c.verifyCredentials == VerifyAlways {
		return store.Tree{}, "", false
	}
	src, rec, ok, err := c.state.CheckedTree(sourceKey)
	if err != nil {
		// A record that cannot be read counts as absent: the credentials
		// are checked again.
		klog.ErrorS(err, "reading source index; treating as not cached")
		return store.Tree{}, "", false
	}
	if !ok || !c.store.HasTree(src.Tree) {
		return store.Tree{}, "", false
	}
	if c.reverifyAfter > 0 && time.Since(src.Checked) > c.reverifyAfter {
		return store.Tree{}, "", false
	}
	return rec.Tree, src.Revision, true
}

// reportProgress tells obs the progress of the download of key every
// ProgressEvery until stop is called.
func (c *Cache) reportProgress(obs Observer, key string) (stop func()) {
	every := c.progressEvery
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(every)
		defer tick.Stop()
		var last int64
		lastAt := time.Now()
		for {
			select {
			case <-done:
				return
			case now := <-tick.C:
				p, ok := c.store.Downloading(key)
				if !ok {
					continue
				}
				d := p.Done()
				rate := float64(d-last) / now.Sub(lastAt).Seconds()
				last, lastAt = d, now
				obs.Progress(d, p.Total, rate)
			}
		}
	}()
	return func() { close(done) }
}

type nopObserver struct{}

func (nopObserver) Resolved(string)                                                   {}
func (nopObserver) Hit(store.Tree)                                                    {}
func (nopObserver) Started(int64)                                                     {}
func (nopObserver) Progress(int64, int64, float64)                                    {}
func (nopObserver) Finished(store.Tree, time.Duration, store.Checks, store.BytesFrom) {}
func (nopObserver) Failed(error)                                                      {}
