package source

import (
	"errors"
	"strings"
	"testing"
)

// A .dockerconfigjson is read whatever it holds: an error is ErrInvalid
// and never repeats a value of the JSON (the entry's key aside).
func FuzzOCICredential(f *testing.F) {
	for _, s := range []string{
		`{"auths":{"r.example":{"auth":"dTpw"}}}`, `{"auths":{"https://r.example/v1/":{"username":"u","password":"SECRET"}}}`,
		`{"auths":{"r.example":{"identitytoken":"SECRET"}}}`, `{"auths":{"r.example":{"auth":"SECRET"}}}`,
		`{"auths":{"r.example":{"password":"SECRET"`, `[]`, `{"auths":{"r.example":null}}`, `{"auths":{"r.example":{"auth":SECRET}}}`,
	} {
		f.Add(s, "hunter2hunter2")
	}
	f.Fuzz(func(t *testing.T, cfg, secret string) {
		if len(secret) < 8 || strings.Contains(cfg, secret) {
			return
		}
		_, err := ociCredentialFor("r.example", map[string]string{dockerConfigKey: strings.ReplaceAll(cfg, "SECRET", secret)})
		if err == nil {
			return
		}
		if !errors.Is(err, ErrInvalid) {
			t.Fatalf("error %v is not ErrInvalid", err)
		}
		if strings.Contains(err.Error(), secret) && !strings.Contains(cfg, `"SECRET":`) {
			t.Fatalf("error %q repeats %q from the secret", err, secret)
		}
	})
}
