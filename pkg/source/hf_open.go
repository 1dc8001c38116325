package source

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"strconv"
	"strings"

	"golang.org/x/sync/errgroup"
)

// Open streams one file of the listed commit. A file that is not an LFS
// file is checked against its git blob oid as it streams: a mismatch is
// ErrCorrupt instead of the end of the file. An LFS file's bytes are the
// store's to check against Entry.SHA256.
func (r *hfRemote) Open(ctx context.Context, e Entry) (io.ReadCloser, error) {
	return r.open(ctx, e, 0, e.Size, false)
}

// OpenRange opens length bytes of a file from offset: a ranged GET of an
// LFS file. A file that is not an LFS file (the Hub keeps those under
// 10 MB) is read whole, so that its git oid checks every byte handed out.
func (r *hfRemote) OpenRange(ctx context.Context, e Entry, offset, length int64) (io.ReadCloser, error) {
	return r.open(ctx, e, offset, length, true)
}

func (r *hfRemote) open(ctx context.Context, e Entry, off, n int64, ranged bool) (_ io.ReadCloser, err error) {
	if err := ValidateKey(e.Path); err != nil {
		return nil, err
	}
	if off < 0 || n < 0 || off+n > e.Size {
		return nil, fmt.Errorf("%w: bytes %d-%d are not in %s/%s (%d bytes)", ErrInvalid, off, off+n-1, r.uri, e.Path, e.Size)
	}
	end := r.conns.begin()
	defer func() {
		if err != nil {
			end()
		}
	}()
	commit, err := r.pinned(ctx)
	if err != nil {
		return nil, err
	}
	oid, isGit := strings.CutPrefix(e.Version, "gitoid:")
	op := fmt.Sprintf("downloading %s/%s (commit %s)", r.uri, e.Path, commit)
	// identity: the bytes as stored, so that sizes and ranges are of the
	// file, not of a compressed form of it.
	hdr := http.Header{"Accept-Encoding": {"identity"}}
	askRange := ranged && !isGit && (off > 0 || n < e.Size)
	if askRange {
		op = fmt.Sprintf("downloading bytes %d-%d of %s/%s (commit %s)", off, off+n-1, r.uri, e.Path, commit)
		hdr.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	}
	resp, err := r.download(ctx, op, r.resolveURL(commit, e.Path), hdr)
	if err != nil {
		return nil, err
	}
	var body io.Reader = resp.Body
	if askRange {
		if body, err = r.window(op, resp, e, off, n); err != nil {
			drainClose(resp.Body)
			return nil, err
		}
	}
	if isGit {
		body = newGitBlobReader(body, oid, e.Size, off, n)
	}
	return &hfBody{r: body, c: resp.Body, op: op, remote: r, end: end}, nil
}

// download GETs a file, following the Hub's redirect to its CDN. A
// signed URL the CDN refuses (it expired between the redirect and the
// request, or a download waited for a connection) is asked for again,
// once.
func (r *hfRemote) download(ctx context.Context, op, u string, hdr http.Header) (*http.Response, error) {
	resp, err := r.do(ctx, r.client, http.MethodGet, op, u, hdr, http.StatusOK, http.StatusPartialContent)
	var se *hfStatusError
	if errors.As(err, &se) && se.offOrigin && (se.status == http.StatusForbidden || se.status == http.StatusUnauthorized) {
		resp, err = r.do(ctx, r.client, http.MethodGet, op, u, hdr, http.StatusOK, http.StatusPartialContent)
	}
	return resp, err
}

// window checks that a ranged response holds bytes off..off+n-1 of a file
// of e.Size bytes. A server that ignores the range (200) sends the whole
// file: its first off bytes are read and dropped.
func (r *hfRemote) window(op string, resp *http.Response, e Entry, off, n int64) (io.Reader, error) {
	if resp.StatusCode == http.StatusOK {
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			return nil, r.netError(op+": skipping to the range in a whole-file answer", err)
		}
		return io.LimitReader(resp.Body, n), nil
	}
	cr := resp.Header.Get("Content-Range")
	var first, last, total int64
	if _, err := fmt.Sscanf(cr, "bytes %d-%d/%d", &first, &last, &total); err != nil {
		return nil, fmt.Errorf("%w: %s: the answer's Content-Range %q is not bytes first-last/size", ErrUnavailable, op, clip(cr))
	}
	if total != e.Size {
		return nil, fmt.Errorf("%w: %s: the file is %d bytes, listed %d", ErrChanged, op, total, e.Size)
	}
	if first != off || last != off+n-1 {
		return nil, fmt.Errorf("%w: %s: the answer holds bytes %d-%d", ErrUnavailable, op, first, last)
	}
	return resp.Body, nil
}

// hfBody is a download's body: read errors classified and scrubbed, the
// remote's request ended on Close.
type hfBody struct {
	r      io.Reader
	c      io.Closer
	op     string
	remote *hfRemote
	end    func()
}

func (b *hfBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil && err != io.EOF && !errors.Is(err, ErrCorrupt) {
		err = b.remote.netError(b.op, err)
	}
	return n, err
}

func (b *hfBody) Close() error {
	err := b.c.Close()
	b.end()
	return err
}

// gitBlobReader hands out bytes skip..skip+n-1 of a git blob of size
// bytes while hashing all of them as git does (sha1 of "blob <size>\0"
// and the content). The window's last byte is held back until the whole
// blob was read and its oid checked: a reader that stops at the window's
// end has then only been given checked bytes, and a mismatch is
// ErrCorrupt, never io.EOF.
type gitBlobReader struct {
	body       io.Reader
	h          hash.Hash
	oid        string
	size, read int64
	skip, left int64
	err        error // sticky: the check's failure, or io.EOF after the window
}

func newGitBlobReader(body io.Reader, oid string, size, skip, n int64) *gitBlobReader {
	h := sha1.New()
	fmt.Fprintf(h, "blob %d\x00", size)
	// One byte past the size is enough to see that the body is longer.
	return &gitBlobReader{body: io.LimitReader(body, size+1), h: h, oid: oid, size: size, skip: skip, left: n}
}

func (g *gitBlobReader) Read(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	if g.skip > 0 {
		k, err := io.CopyN(g.h, g.body, g.skip)
		g.read += k
		g.skip -= k
		if err != nil {
			return 0, g.short(err)
		}
	}
	if g.left > 1 && len(p) > 0 {
		p = p[:min(int64(len(p)), g.left-1)]
		k, err := g.body.Read(p)
		g.h.Write(p[:k])
		g.read += int64(k)
		g.left -= int64(k)
		if err != nil {
			return k, g.short(err)
		}
		return k, nil
	}
	// The window's last byte, if any, then the rest of the blob.
	var last [1]byte
	if g.left == 1 {
		if _, err := io.ReadFull(g.body, last[:]); err != nil {
			return 0, g.short(err)
		}
		g.h.Write(last[:])
		g.read++
	}
	k, err := io.Copy(g.h, g.body)
	g.read += k
	if err != nil {
		return 0, g.short(err)
	}
	if err := g.check(); err != nil {
		g.err = err
		return 0, err
	}
	g.err = io.EOF
	if g.left == 1 && len(p) > 0 {
		g.left = 0
		p[0] = last[0]
		return 1, nil
	}
	g.left = 0
	return 0, io.EOF
}

// short turns the end of the body before the blob's end into ErrCorrupt;
// other errors pass.
func (g *gitBlobReader) short(err error) error {
	if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
		g.err = fmt.Errorf("%w: the file ended after %d of its %d bytes", ErrCorrupt, g.read, g.size)
		return g.err
	}
	return err
}

func (g *gitBlobReader) check() error {
	if g.read != g.size {
		return fmt.Errorf("%w: the file has %d bytes, listed %d", ErrCorrupt, g.read, g.size)
	}
	if sum := hex.EncodeToString(g.h.Sum(nil)); sum != g.oid {
		return fmt.Errorf("%w: the file's git blob oid is %s, the commit lists %s", ErrCorrupt, sum, g.oid)
	}
	return nil
}

// Verify checks that this remote's token may download every file of m at
// the listed commit: one HEAD of its resolve URL per file, redirects not
// followed (the Hub answers 200 for a small file, 302 to its CDN for an
// LFS file, once it allowed the download), at most verifyParallelism at
// once. A gated model's listing is public and only its downloads ask for
// the terms accepted, so the listing proves nothing; per file, because a
// mirror may answer per file, and a file the commit lacks must fail.
func (r *hfRemote) Verify(ctx context.Context, m Manifest) error {
	if err := verifiable(r.uri, m); err != nil {
		return err
	}
	defer r.conns.begin()()
	commit, err := r.pinned(ctx)
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(verifyParallelism)
	for _, e := range m {
		if gctx.Err() != nil {
			break
		}
		g.Go(func() error { return r.verifyEntry(gctx, commit, e) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return r.netError(fmt.Sprintf("checking %s", r.uri), err)
	}
	return nil
}

// verifyEntry HEADs one file and compares what the answer says of it (the
// Hub's X-Linked-ETag and X-Linked-Size for an LFS file, ETag and
// Content-Length for another) with the listing.
func (r *hfRemote) verifyEntry(ctx context.Context, commit string, e Entry) error {
	op := fmt.Sprintf("checking access to %s/%s (commit %s)", r.uri, e.Path, commit)
	resp, err := r.do(ctx, r.headClient, http.MethodHead, op, r.resolveURL(commit, e.Path),
		http.Header{"Accept-Encoding": {"identity"}}, http.StatusOK, http.StatusFound, http.StatusTemporaryRedirect)
	if err != nil {
		return err
	}
	drainClose(resp.Body)
	changed := func(what string, now, listed any) error {
		return fmt.Errorf("%w: %s: the Hub gives %s %v, the listing %v", ErrChanged, op, what, now, listed)
	}
	linked := normalizeETag(resp.Header.Get("X-Linked-Etag"))
	if e.SHA256 != "" {
		if hexSHA.MatchString(linked) && linked != e.SHA256 {
			return changed("sha256", linked, e.SHA256)
		}
		if s, err := strconv.ParseInt(resp.Header.Get("X-Linked-Size"), 10, 64); err == nil && s != e.Size {
			return changed("size", s, e.Size)
		}
		return nil
	}
	if oid, ok := strings.CutPrefix(e.Version, "gitoid:"); ok {
		if et := normalizeETag(resp.Header.Get("ETag")); linked == "" && hexSHA1.MatchString(et) && et != oid {
			return changed("git oid", et, oid)
		}
	}
	if resp.StatusCode == http.StatusOK && resp.ContentLength >= 0 && resp.ContentLength != e.Size {
		return changed("size", resp.ContentLength, e.Size)
	}
	return nil
}

// normalizeETag drops a weak marker and quotes, as huggingface_hub does.
func normalizeETag(v string) string {
	return strings.Trim(strings.TrimPrefix(strings.TrimSpace(v), "W/"), `"`)
}

// ChecksWhileStreaming reports the files Open checks itself: those named by
// their git blob id (not LFS), whose read fails before its end when the
// bytes are not that blob's (store.StreamChecker).
func (r *hfRemote) ChecksWhileStreaming(e Entry) bool {
	return strings.HasPrefix(e.Version, "gitoid:")
}
