package remotespec

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// keyOfLen builds a valid key of exactly n bytes from segments of at most 100 bytes.
func keyOfLen(n int) string {
	var b strings.Builder
	for b.Len() < n {
		if b.Len() > 0 {
			b.WriteByte('/')
		}
		seg := min(100, n-b.Len())
		b.WriteString(strings.Repeat("k", seg))
	}
	return b.String()
}

func TestValidateKey(t *testing.T) {
	good := []struct {
		name string
		key  string
	}{
		{"single byte", "a"},
		{"nested", "a/b/c.bin"},
		{"dotfile", ".gitattributes"},
		{"dots inside names", "a..b/..c/d.."},
		{"three dots", "a/.../b"},
		{"fullwidth dot inside a name", "v\uff0e1/w\uff0e\uff0e\uff0e"},
		{"unicode", "modèle/权重/🤗.safetensors"},
		{"spaces and colons", "my model/v1:final.bin"},
		{"segment of 255 bytes", strings.Repeat("s", maxSegment)},
		{"format characters other than bidirectional controls", "a\u00adb/\u200bz\u200d"},
		{"right-to-left script", "نموذج/מודל.bin"},
		{"fullwidth dots with a name", "\uff0e\uff0ex/\uff0ea"},
		{"path of 4096 bytes", keyOfLen(maxPath)},
	}
	for _, tc := range good {
		t.Run("good/"+tc.name, func(t *testing.T) {
			if err := ValidateKey(tc.key); err != nil {
				t.Errorf("ValidateKey(%.40q) = %v, want nil", tc.key, err)
			}
		})
	}

	bad := []struct {
		name    string
		key     string
		wantMsg string
	}{
		{"empty", "", "is empty"},
		{"absolute", "/abs", "is absolute"},
		{"root", "/", "is absolute"},
		{"parent", "..", `".." segment`},
		{"escape", "../escape", `".." segment`},
		{"escape after descent", "a/../../x", `".." segment`},
		{"parent at end", "a/b/..", `".." segment`},
		{"empty segment", "a//b", "empty segment"},
		{"trailing slash", "a/b/", "empty segment"},
		{"leading dot segment", "./a", `"." segment`},
		{"rclone-encoded parent", "\uff0e\uff0e/escape", `".." segment at the remote`},
		{"rclone-encoded parent deep", "a/\uff0e\uff0e/\uff0e\uff0e/x", `".." segment at the remote`},
		{"rclone-encoded dot", "a/\uff0e/b", `"." segment at the remote`},
		{"trailing dot segment", "a/.", `"." segment`},
		{"only dot", ".", `"." segment`},
		{"NUL", "a\x00b", "NUL"},
		{"backslash", `a\b`, "backslash"},
		{"backslash escape", `..\..\etc`, "backslash"},
		{"segment of 256 bytes", "a/" + strings.Repeat("s", maxSegment+1), "segment longer than 255"},
		{"path of 4097 bytes", keyOfLen(maxPath + 1), "longer than 4096"},
		{"invalid UTF-8", "a/\xff\xfe.bin", "UTF-8"},
		{"newline", "a/b\nc", "control character"},
		{"carriage return", "model.bin\r", "control character"},
		{"tab", "a\tb", "control character"},
		{"escape sequence", "\x1b[31mred", "control character"},
		{"SOH", "\x01", "control character"},
		{"DEL", "a/\x7f", "control character"},
		{"C1 next line", "a\u0085b", "control character"},
		{"C1 control sequence introducer", "\u009b31mred", "control character"},
		{"C1 first", "a/\u0080", "control character"},
		{"C1 last", "a/\u009f", "control character"},
		{"arabic letter mark", "a\u061cb", "bidirectional control character"},
		{"left-to-right mark", "a/\u200e", "bidirectional control character"},
		{"right-to-left mark", "\u200fa", "bidirectional control character"},
		{"left-to-right embedding", "a\u202ab", "bidirectional control character"},
		{"right-to-left override", "model\u202enib.exe", "bidirectional control character"},
		{"left-to-right isolate", "a\u2066b", "bidirectional control character"},
		{"pop directional isolate", "a/b\u2069", "bidirectional control character"},
		{"segment of 256 multi-byte bytes", strings.Repeat("é", 128), "segment longer than 255"},
		{"truncated UTF-8", "a/\xe6\x9d", "UTF-8"},
	}
	for _, tc := range bad {
		t.Run("bad/"+tc.name, func(t *testing.T) {
			err := ValidateKey(tc.key)
			if !errors.Is(err, ErrUnsafePath) {
				t.Fatalf("ValidateKey(%.40q) = %v, want ErrUnsafePath", tc.key, err)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("ValidateKey(%.40q) error %q does not say %q", tc.key, err, tc.wantMsg)
			}
		})
	}
}

// Errors quote the key with %q: a hostile key cannot inject lines or
// terminal escapes into logs and events.
func TestValidateKeyQuotesTheKey(t *testing.T) {
	for _, key := range []string{"a\nINFO fake log line", "\x1b]0;title\x07", "../\x00", "\u009b2J", "model\u202enib.exe"} {
		err := ValidateKey(key)
		if err == nil {
			t.Fatalf("ValidateKey(%q) = nil", key)
		}
		if !strings.Contains(err.Error(), fmt.Sprintf("%q", key)) || strings.ContainsAny(err.Error(), "\n\x1b\x00\x07\u009b\u202e") {
			t.Errorf("ValidateKey(%q) error %q does not quote the key", key, err)
		}
	}
}

func TestFoldPathMatchesEqualFold(t *testing.T) {
	pairs := [][2]string{
		{"Model.bin", "model.bin"}, {"\u212a", "k"}, {"\u017f", "S"}, {"ß", "ẞ"}, {"Σ", "ς"}, {"ǅ", "ǆ"},
		{"a", "b"}, {"ß", "ss"}, {"İ", "i"}, {"é", "e\u0301"},
	}
	for _, p := range pairs {
		if got, want := foldPath(p[0]) == foldPath(p[1]), strings.EqualFold(p[0], p[1]); got != want {
			t.Errorf("foldPath(%q) == foldPath(%q) is %v, strings.EqualFold says %v", p[0], p[1], got, want)
		}
	}
}
