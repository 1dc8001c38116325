package source

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"

	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/errcode"
)

// RangeChecker is a store.RangeFetcher some of whose entries cannot be
// read in ranges: the store must read those in one stream.
type RangeChecker interface {
	CanRange(e Entry) bool
}

// ociRanged is an oci:// model that also reads ranges of its raw layers,
// for parallel chunked downloads. A tar layer's file is not the layer's
// bytes and is checked only by reading the whole layer, so it has no
// ranges; neither has a registry that ignores Range.
//
// The store reads in one stream the entries CanRange refuses, and a file
// whose ranged read finds the registry without Range support
// (ErrNoRanges).
type ociRanged struct {
	*ociRemote
	noRanges *atomic.Bool // the registry answered a Range with the whole blob
}

func newOCIRanged(r *ociRemote) ociRanged { return ociRanged{r, new(atomic.Bool)} }

// CanRange reports whether OpenRange can read e: a raw layer, from a
// registry not yet seen to ignore Range.
func (r ociRanged) CanRange(e Entry) bool {
	l, err := r.layer(e)
	return err == nil && l.format == formatRaw && !r.noRanges.Load()
}

// OpenRange reads length bytes of a raw layer from offset: oras-go's
// blob reader, which seeks with a ranged GET when the registry says it
// serves ranges (Accept-Ranges: bytes).
func (r ociRanged) OpenRange(ctx context.Context, e Entry, offset, length int64) (_ io.ReadCloser, err error) {
	l, err := r.layer(e)
	if err != nil {
		return nil, err
	}
	op := fmt.Sprintf("opening %s/%s bytes %d-%d", r.uri, e.Path, offset, offset+length-1)
	switch {
	case l.format != formatRaw:
		return nil, fmt.Errorf("%w: %s: the file is in a %s, which is read whole, not in ranges", ErrInvalid, op, l.format)
	case offset < 0 || length <= 0 || offset+length > l.desc.Size:
		return nil, fmt.Errorf("%w: %s: the layer is %d bytes", ErrChanged, op, l.desc.Size)
	}
	end := r.conns.begin()
	defer func() {
		if err != nil {
			end()
		}
	}()
	// One bounded ranged GET per chunk: oras-go's seekable reader would
	// GET the whole blob first and then again from offset, two requests
	// and two first-byte waits per chunk.
	body, err := r.getRange(ctx, l.desc.Digest.String(), offset, length)
	if errors.Is(err, ErrNoRanges) {
		r.noRanges.Store(true)
	}
	if err != nil {
		return nil, r.classify(op, err)
	}
	limited := struct {
		io.Reader
		io.Closer
	}{io.LimitReader(body, length), body}
	return &ociReader{rc: limited, op: fmt.Sprintf("reading %s/%s", r.uri, e.Path), remote: r.ociRemote, end: end}, nil
}

// getRange GETs bytes [offset, offset+length) of a blob through the
// repository's client (its token flow, with the pull scope, and the egress
// Guard's dialer for the registry and any redirect). A registry that
// answers with the whole blob is ErrNoRanges.
func (r ociRanged) getRange(ctx context.Context, dgst string, offset, length int64) (io.ReadCloser, error) {
	ref := r.repo.Reference
	scheme := "https"
	if r.repo.PlainHTTP {
		scheme = "http"
	}
	url := fmt.Sprintf("%s://%s/v2/%s/blobs/%s", scheme, ref.Host(), ref.Repository, dgst)
	ctx = auth.AppendRepositoryScope(ctx, ref, auth.ActionPull)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", offset, offset+length-1))
	resp, err := r.repo.Client.Do(req)
	if err != nil {
		return nil, err
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if !strings.HasPrefix(resp.Header.Get("Content-Range"), fmt.Sprintf("bytes %d-", offset)) {
			resp.Body.Close()
			return nil, fmt.Errorf("%w: the registry answered bytes %q for a range from %d", ErrChanged, resp.Header.Get("Content-Range"), offset)
		}
		return resp.Body, nil
	case http.StatusOK:
		resp.Body.Close()
		return nil, fmt.Errorf("%w: %w: the registry does not serve byte ranges", ErrUnavailable, ErrNoRanges)
	default:
		resp.Body.Close()
		return nil, &errcode.ErrorResponse{Method: req.Method, URL: req.URL, StatusCode: resp.StatusCode}
	}
}
