package remotespec

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits on remote object keys. They match what Linux filesystems accept so a
// key that passes can always be created inside a tree.
const (
	maxSegment = 255
	maxPath    = 4096
)

// encodedDot is how rclone's encoder (EncodeDot) shows a "." that is a whole
// path segment at the remote: U+FF0E FULLWIDTH FULL STOP.
const encodedDot = "\uff0e"

// ValidateKey checks that a remote object key, relative to the model root, is
// a clean relative path that stays inside the tree once created. The "no remote input becomes a path unchecked" invariant:
// no remote input becomes a path unchecked. The rules: not empty, valid
// UTF-8, relative, no NUL, backslash or other control character (C0, DEL,
// C1), no bidirectional control character, no empty, "." or ".." segment
// (nor rclone's encoded forms of them), segments of at most 255 bytes and
// at most 4096 bytes in all. Errors wrap ErrUnsafePath and quote the key
// with %q, so non-printable bytes are escaped.
func ValidateKey(key string) error {
	bad := func(why string) error {
		return fmt.Errorf("%w: %q %s", ErrUnsafePath, key, why)
	}
	switch {
	case key == "":
		return bad("is empty")
	case len(key) > maxPath:
		return bad(fmt.Sprintf("is longer than %d bytes", maxPath))
	case !utf8.ValidString(key):
		return bad("is not valid UTF-8")
	case strings.HasPrefix(key, "/"):
		return bad("is absolute")
	case strings.ContainsAny(key, "\x00\\"):
		return bad("contains NUL or a backslash")
	case strings.ContainsFunc(key, isControl):
		// A newline or escape sequence in a file name corrupts logs and
		// listings; no model needs one.
		return bad("contains a control character")
	case strings.ContainsFunc(key, isBidiControl):
		// A right-to-left override shows "model\u202Enib.exe" as
		// "modelexe.bin" in a terminal or a review: a name that reads as
		// another. No model needs one.
		return bad("contains a bidirectional control character")
	}
	for _, seg := range strings.Split(key, "/") {
		switch {
		case seg == "":
			return bad("has an empty segment")
		case seg == "." || seg == "..":
			return bad(fmt.Sprintf("has a %q segment", seg))
		case seg == encodedDot || seg == encodedDot+encodedDot:
			// rclone's backends hand a remote "." or ".." segment over in
			// this encoded form so it cannot walk out of a local directory.
			// It is still a key built to escape, not a model file.
			return bad(fmt.Sprintf("has a %q segment at the remote", strings.ReplaceAll(seg, encodedDot, ".")))
		case len(seg) > maxSegment:
			return bad(fmt.Sprintf("has a segment longer than %d bytes", maxSegment))
		}
	}
	return nil
}

// isControl reports C0 control characters, DEL and C1 control characters
// (U+0080-U+009F): terminals act on C1 too, U+009B starts an escape
// sequence as ESC [ does.
func isControl(r rune) bool { return unicode.IsControl(r) }

// isBidiControl reports the characters that reorder text around them
// (Unicode's Bidi_Control property): the Arabic letter mark, the
// left-to-right and right-to-left marks, embeddings, overrides and isolates.
func isBidiControl(r rune) bool { return unicode.Is(unicode.Bidi_Control, r) }

// foldPath maps a path to one representative of its case-folding class:
// foldPath(a) == foldPath(b) exactly when strings.EqualFold(a, b).
func foldPath(p string) string {
	return strings.Map(func(r rune) rune {
		low := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			low = min(low, f)
		}
		return low
	}, p)
}
