package source

import (
	"context"
	"fmt"
	"io"
	"sync/atomic"
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
	rc, err := r.repo.Blobs().Fetch(ctx, l.desc)
	if err != nil {
		return nil, r.classify(op, err)
	}
	s, ok := rc.(io.ReadSeekCloser)
	if !ok {
		rc.Close()
		r.noRanges.Store(true)
		return nil, fmt.Errorf("%w: %w: %s: the registry does not serve byte ranges", ErrUnavailable, ErrNoRanges, op)
	}
	if _, err := s.Seek(offset, io.SeekStart); err != nil {
		s.Close()
		return nil, r.classify(op, err)
	}
	limited := struct {
		io.Reader
		io.Closer
	}{io.LimitReader(s, length), s}
	return &ociReader{rc: limited, op: fmt.Sprintf("reading %s/%s", r.uri, e.Path), remote: r.ociRemote, end: end}, nil
}
