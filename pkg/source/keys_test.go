package source

import (
	"errors"
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
