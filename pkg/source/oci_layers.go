package source

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"

	"github.com/klauspost/compress/zstd"
)

// layerFormat is how a ModelPack layer holds its file.
type layerFormat int

const (
	formatRaw     layerFormat = iota // the layer is the file
	formatTar                        // a tar archive of the file
	formatTarGzip                    // the same, gzip-compressed
	formatTarZstd                    // the same, zstd-compressed
)

func (f layerFormat) String() string {
	return [...]string{"raw file", "tar archive", "gzip-compressed tar archive", "zstd-compressed tar archive"}[f]
}

// layerFormatOf reads a layer's media type by its suffix, as model-spec
// names them for every kind of file (weight, weight config, doc, code,
// dataset; the older vnd.cnai names too).
func layerFormatOf(mediaType string) (layerFormat, bool) {
	switch {
	case strings.HasSuffix(mediaType, ".raw"):
		return formatRaw, true
	case strings.HasSuffix(mediaType, ".tar"):
		return formatTar, true
	case strings.HasSuffix(mediaType, ".tar+gzip"):
		return formatTarGzip, true
	case strings.HasSuffix(mediaType, ".tar+zstd"):
		return formatTarZstd, true
	}
	return 0, false
}

const (
	// maxTarDirs bounds the directory entries read around a layer's file
	// (a tar of one file made from its directory holds a few).
	maxTarDirs = 64
	// maxTarTrailer bounds what follows the file in the decompressed
	// archive: its padding and end blocks are a few KiB; a compressed
	// stream of zeros would otherwise be read for ever.
	maxTarTrailer = 1 << 20
	// zstdMaxWindow bounds a zstd decoder's memory: zstd's own default
	// limit for a frame is 8 MiB, --long=27 uses 128 MiB.
	zstdMaxWindow = 128 << 20
)

// decompress reads a layer's archive out of its bytes.
func decompress(r io.Reader, f layerFormat) (io.Reader, func(), error) {
	switch f {
	case formatTarGzip:
		z, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, err
		}
		return z, func() { z.Close() }, nil
	case formatTarZstd:
		z, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxWindow(zstdMaxWindow))
		if err != nil {
			return nil, nil, err
		}
		return z, z.Close, nil
	}
	return r, func() {}, nil
}

func typeName(flag byte) string {
	switch flag {
	case tar.TypeDir:
		return "directory"
	case tar.TypeSymlink:
		return "symbolic link"
	case tar.TypeLink:
		return "hard link"
	}
	return fmt.Sprintf("tar entry of type %q", flag)
}

// firstFile reads an archive up to its one regular file, past directory
// entries; links and devices are refused.
func firstFile(tr *tar.Reader, where string) (*tar.Header, error) {
	for range maxTarDirs {
		hdr, err := tr.Next()
		switch {
		case err == io.EOF:
			return nil, fmt.Errorf("%w: %s: the layer's archive holds no regular file", ErrInvalid, where)
		case err != nil:
			return nil, err
		case hdr.Typeflag == tar.TypeDir:
			continue
		case hdr.Typeflag != tar.TypeReg:
			return nil, fmt.Errorf("%w: %s: the layer's archive holds a %s, not a regular file", ErrInvalid, where, typeName(hdr.Typeflag))
		}
		return hdr, nil
	}
	return nil, fmt.Errorf("%w: %s: the layer's archive holds more than %d directories before its file", ErrInvalid, where, maxTarDirs)
}

// tarFileSize reads the header of a tar layer whose manifest gives no
// file metadata: the first bytes of its stream, decompressed.
func (r *ociRemote) tarFileSize(ctx context.Context, l ociLayer, path string) (int64, error) {
	where := fmt.Sprintf("%s/%s (layer %s)", r.uri, path, l.desc.Digest)
	rc, err := r.repo.Blobs().Fetch(ctx, l.desc)
	if err != nil {
		return 0, r.classify("reading the archive header of "+where, err)
	}
	body := &ociReader{rc: rc, op: "reading the archive header of " + where, remote: r, end: func() {}}
	defer body.Close()
	dec, closeDec, err := decompress(io.LimitReader(body, l.desc.Size), l.format)
	if err != nil {
		return 0, decodeErr(body, err, where, l.format)
	}
	defer closeDec()
	hdr, err := firstFile(tar.NewReader(dec), where)
	if err != nil {
		return 0, decodeErr(body, err, where, l.format)
	}
	return hdr.Size, nil
}

// decodeErr is what an archive that cannot be read means: the stream's own
// failure (a reset connection), the package's error kinds as they are,
// else bytes that are not what the media type says, which a byte changed
// in transfer also gives.
func decodeErr(body *ociReader, err error, where string, f layerFormat) error {
	var ke *kindError
	switch {
	case body.err != nil:
		return body.err
	case errors.As(err, &ke):
		return err
	}
	return fmt.Errorf("%w: %s cannot be read as a %s (%v): corrupted in transfer, or not what its media type says", ErrCorrupt, where, f, err)
}

// tarFile streams the one file of a tar layer. The whole layer is read
// and checked against its digest before the reader reports EOF, so a file
// whose archive was changed in transfer is never taken for complete.
type tarFile struct {
	where  string
	l      ociLayer
	body   *ociReader
	hashed *hashingReader
	dec    io.Reader
	close  func()
	tr     *tar.Reader
	left   int64
	err    error
}

func newTarFile(r *ociRemote, l ociLayer, e Entry, body *ociReader) (*tarFile, error) {
	t := &tarFile{where: fmt.Sprintf("%s/%s (layer %s)", r.uri, e.Path, l.desc.Digest), l: l, body: body, close: func() {}}
	// One byte past the size: a longer stream is not the layer either.
	t.hashed = &hashingReader{r: io.LimitReader(body, l.desc.Size+1), h: sha256.New()}
	dec, closeDec, err := decompress(t.hashed, l.format)
	if err != nil {
		return nil, decodeErr(body, err, t.where, l.format)
	}
	t.dec, t.close = dec, closeDec
	t.tr = tar.NewReader(dec)
	hdr, err := firstFile(t.tr, t.where)
	if err != nil {
		closeDec()
		return nil, decodeErr(body, err, t.where, l.format)
	}
	if hdr.Size != e.Size {
		closeDec()
		return nil, fmt.Errorf("%w: %s: the layer's archive holds a file of %d bytes, the manifest says %d", ErrInvalid, t.where, hdr.Size, e.Size)
	}
	t.left = hdr.Size
	return t, nil
}

func (t *tarFile) Read(p []byte) (int, error) {
	if t.err != nil {
		return 0, t.err
	}
	if t.left > 0 {
		if int64(len(p)) > t.left {
			p = p[:t.left]
		}
		n, err := t.tr.Read(p)
		t.left -= int64(n)
		if err == io.EOF && t.left > 0 {
			err = io.ErrUnexpectedEOF
		}
		if err != nil && err != io.EOF {
			t.err = decodeErr(t.body, err, t.where, t.l.format)
			return n, t.err
		}
		if n > 0 || t.left > 0 {
			return n, nil
		}
	}
	t.err = t.finish()
	if t.err == nil {
		t.err = io.EOF
	}
	return 0, t.err
}

// finish reads the rest of the layer and checks its size and digest.
func (t *tarFile) finish() error {
	for range maxTarDirs {
		hdr, err := t.tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return decodeErr(t.body, err, t.where, t.l.format)
		}
		if hdr.Typeflag != tar.TypeDir {
			return fmt.Errorf("%w: %s: the layer's archive holds more than one file; layers of several files are not supported", ErrInvalid, t.where)
		}
	}
	n, err := io.Copy(io.Discard, io.LimitReader(t.dec, maxTarTrailer+1))
	if err != nil {
		return decodeErr(t.body, err, t.where, t.l.format)
	}
	if n > maxTarTrailer {
		return fmt.Errorf("%w: %s: the layer's archive goes on past its end", ErrInvalid, t.where)
	}
	if _, err := io.Copy(io.Discard, t.hashed); err != nil {
		return decodeErr(t.body, err, t.where, t.l.format)
	}
	if t.hashed.n != t.l.desc.Size {
		return fmt.Errorf("%w: %s: the registry sent %d bytes of a %d-byte layer", ErrCorrupt, t.where, t.hashed.n, t.l.desc.Size)
	}
	if got := hex.EncodeToString(t.hashed.h.Sum(nil)); got != t.l.desc.Digest.Encoded() {
		return fmt.Errorf("%w: %s: the layer's bytes have sha256 %s, not its digest", ErrCorrupt, t.where, got)
	}
	return nil
}

func (t *tarFile) Close() error {
	t.close()
	return t.body.Close()
}

// hashingReader hashes and counts what is read through it.
type hashingReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (h *hashingReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

// ChecksWhileStreaming reports the files Open checks itself: those of tar
// layers, whose read fails before its end when the layer's bytes do not
// match its digest (store.StreamChecker). A raw layer's file is the
// store's to check against Entry.SHA256.
func (r *ociRemote) ChecksWhileStreaming(e Entry) bool {
	return e.SHA256 == "" && strings.HasPrefix(e.Version, "digest:")
}
