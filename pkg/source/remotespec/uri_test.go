package remotespec

import (
	"errors"
	"strings"
	"testing"
)

func TestParseURIAcceptsEveryForm(t *testing.T) {
	longest := "mys3:" + strings.Repeat("a", 2048-len("mys3:"))
	tests := []struct {
		name       string
		in         string
		want       URI
		wantString string
	}{
		{"remote", "mys3:models/iris", URI{Scheme: SchemeRemote, Remote: "mys3", Path: "models/iris"}, "mys3:models/iris"},
		{"remote with dash, underscore, digits", "my-s3_2:bucket/a/b", URI{Scheme: SchemeRemote, Remote: "my-s3_2", Path: "bucket/a/b"}, "my-s3_2:bucket/a/b"},
		{"remote with mixed case", "MyS3:bucket", URI{Scheme: SchemeRemote, Remote: "MyS3", Path: "bucket"}, "MyS3:bucket"},
		{"remote trims slashes", "mys3:/bucket/model/", URI{Scheme: SchemeRemote, Remote: "mys3", Path: "bucket/model"}, "mys3:bucket/model"},
		{"remote name of 63 bytes", strings.Repeat("r", 63) + ":b", URI{Scheme: SchemeRemote, Remote: strings.Repeat("r", 63), Path: "b"}, strings.Repeat("r", 63) + ":b"},
		{"remote path with unicode and spaces", "mys3:bücket/模型/my model", URI{Scheme: SchemeRemote, Remote: "mys3", Path: "bücket/模型/my model"}, "mys3:bücket/模型/my model"},
		{"remote path with colon", "mys3:bucket/a:b", URI{Scheme: SchemeRemote, Remote: "mys3", Path: "bucket/a:b"}, "mys3:bucket/a:b"},
		{"remote uri of exactly 2048 bytes", longest, URI{Scheme: SchemeRemote, Remote: "mys3", Path: longest[len("mys3:"):]}, longest},
		{"s3 bucket and prefix", "s3://bucket/prefix/model", URI{Scheme: SchemeS3, Path: "bucket/prefix/model"}, "s3://bucket/prefix/model"},
		{"s3 bucket only", "s3://bucket", URI{Scheme: SchemeS3, Path: "bucket"}, "s3://bucket"},
		{"s3 trailing slash", "s3://bucket/model/", URI{Scheme: SchemeS3, Path: "bucket/model"}, "s3://bucket/model"},
		{"gs bucket and prefix", "gs://bucket/p/m", URI{Scheme: SchemeGCS, Path: "bucket/p/m"}, "gs://bucket/p/m"},
		{"https host and path", "https://models.example.com/m/model.bin", URI{Scheme: SchemeHTTPS, Host: "models.example.com", Path: "m/model.bin"}, "https://models.example.com/m/model.bin"},
		{"https host with port", "https://models.example.com:8443/m/", URI{Scheme: SchemeHTTPS, Host: "models.example.com:8443", Path: "m"}, "https://models.example.com:8443/m"},
		{"https ip address", "https://10.0.0.1/x", URI{Scheme: SchemeHTTPS, Host: "10.0.0.1", Path: "x"}, "https://10.0.0.1/x"},
		{"hf org and model", "hf://meta-llama/Llama-3.1-8B", URI{Scheme: SchemeHF, Path: "meta-llama/Llama-3.1-8B", Ref: "main"}, "hf://meta-llama/Llama-3.1-8B@main"},
		{"hf model without org", "hf://gpt2", URI{Scheme: SchemeHF, Path: "gpt2", Ref: "main"}, "hf://gpt2@main"},
		{"hf commit", "hf://org/m@0123456789abcdef0123456789abcdef01234567", URI{Scheme: SchemeHF, Path: "org/m", Ref: "0123456789abcdef0123456789abcdef01234567"}, "hf://org/m@0123456789abcdef0123456789abcdef01234567"},
		{"hf pull request", "hf://org/m@refs/pr/3", URI{Scheme: SchemeHF, Path: "org/m", Ref: "refs/pr/3"}, "hf://org/m@refs/pr/3"},
		{"hf tag with dots", "hf://org/m.v2@v1.0", URI{Scheme: SchemeHF, Path: "org/m.v2", Ref: "v1.0"}, "hf://org/m.v2@v1.0"},
		{"oci tag", "oci://registry.example.com/models/llama:v1", URI{Scheme: SchemeOCI, Host: "registry.example.com", Path: "models/llama", Ref: "v1"}, "oci://registry.example.com/models/llama:v1"},
		{"oci without tag", "oci://registry.example.com:5000/m", URI{Scheme: SchemeOCI, Host: "registry.example.com:5000", Path: "m", Ref: "latest"}, "oci://registry.example.com:5000/m:latest"},
		{"oci digest", "oci://127.0.0.1:5000/a/b@sha256:" + strings.Repeat("ab", 32), URI{Scheme: SchemeOCI, Host: "127.0.0.1:5000", Path: "a/b", Ref: "sha256:" + strings.Repeat("ab", 32)}, "oci://127.0.0.1:5000/a/b@sha256:" + strings.Repeat("ab", 32)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseURI(tc.in)
			if err != nil {
				t.Fatalf("ParseURI(%q) = error %v, want %+v", tc.in, err, tc.want)
			}
			if got != tc.want {
				t.Errorf("ParseURI(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
			if s := got.String(); s != tc.wantString {
				t.Errorf("ParseURI(%q).String() = %q, want %q", tc.in, s, tc.wantString)
			}
			// The canonical form parses back to the same URI.
			again, err := ParseURI(got.String())
			if err != nil || again != got {
				t.Errorf("ParseURI(%q) = %+v, %v; want the round trip to give %+v", got.String(), again, err, got)
			}
		})
	}
}

func TestParseURIRejects(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantMsg string // a fragment the operator needs to see
	}{
		{"empty", "", "empty"},
		{"blank", "   ", "no remote or scheme"},
		{"hf three segments", "hf://org/model/sub", "not a Hub repository id"},
		{"hf empty", "hf://", "not a Hub repository id"},
		{"hf double dash", "hf://org/a--b", "not a Hub repository id"},
		{"hf dot dot", "hf://org/..", "not a Hub repository id"},
		{"hf leading dash", "hf://-org/m", "not a Hub repository id"},
		{"hf empty revision", "hf://org/m@", "is not a branch, tag"},
		{"hf revision dot dot", "hf://org/m@refs/../x", "is not a branch, tag"},
		{"hf revision trailing slash", "hf://org/m@refs/pr/", "is not a branch, tag"},
		{"hf query", "hf://org/m?token=x", "query or fragment"},
		{"oci no repository", "oci://registry.example.com", "not registry/repository"},
		{"oci upper-case repository", "oci://r.example.com/Models/x:v1", "not registry/repository"},
		{"oci user info", "oci://user:pw@r.example.com/m:v1", "user info"},
		{"oci sha512 digest", "oci://r.example.com/m@sha512:" + strings.Repeat("ab", 64), "is not sha256"},
		{"oci ipv6 registry", "oci://[::1]:5000/m:v1", "registry"},
		{"bare path", "models/iris", "no remote or scheme"},
		{"absolute local path", "/x", "no remote or scheme"},
		{"relative local path", "./x", "no remote or scheme"},
		{"ftp scheme", "ftp://host/x", `scheme "ftp" is not supported`},
		{"file scheme", "file:///etc/passwd", `scheme "file" is not supported`},
		{"plain http", "http://host/x", `scheme "http" is not supported`},
		{"upper-case scheme", "S3://bucket/x", `scheme "S3" is not supported`},
		{"hdfs scheme", "hdfs://namenode/x", `scheme "hdfs" is not supported`},
		{"windows path", `C:\models`, "backslash"},
		{"backslash in path", `mys3:bucket\x`, "backslash"},
		{"connection string on-the-fly backend", ":s3,provider=AWS:bucket", "connection string"},
		{"connection string on-the-fly no options", ":s3:bucket", "connection string"},
		{"connection string named remote", "mys3,provider=x:b", "connection string"},
		{"connection string with equals only", "mys3=x:b", "connection string"},
		{"remote name with dot", "my.s3:b", `remote name "my.s3" is invalid`},
		{"remote name starting with dash", "-x:b", `remote name "-x" is invalid`},
		{"remote name of 64 bytes", strings.Repeat("r", 64) + ":b", "is invalid"},
		{"remote dotdot segment", "mys3:bucket/../x", `".." segment`},
		{"remote only dotdot", "mys3:..", `".." segment`},
		{"remote dot segment", "mys3:bucket/./x", `"." segment`},
		{"remote trailing dot", "mys3:bucket/.", `"." segment`},
		{"remote empty segment", "mys3:bucket//x", "empty segment"},
		{"remote without path", "mys3:", "no bucket or path"},
		{"remote with only a slash", "mys3:/", "no bucket or path"},
		{"unknown scheme spelled like a remote", "mys3:///", `scheme "mys3" is not supported`},
		{"s3 dotdot", "s3://bucket/../other", `".." segment`},
		{"s3 dot", "s3://./x", `"." segment`},
		{"s3 empty segment", "s3://bucket//x", "empty segment"},
		{"s3 without bucket", "s3://", "no bucket or path"},
		{"gs dotdot", "gs://a/../b", `".." segment`},
		{"https dotdot", "https://host/a/../b", `".." segment`},
		{"https empty segment", "https://host/a//b", "empty segment"},
		{"https without path", "https://host", "no bucket or path"},
		{"https root only", "https://host/", "no bucket or path"},
		{"https empty host", "https:///x", "host"},
		{"https host with underscore", "https://bad_host/x", `host "bad_host" is invalid`},
		{"https port too long", "https://host:123456/x", "is invalid"},
		{"https user info", "https://user:pw@host/x", "user info"},
		{"https query", "https://host/x?token=abc", "query or fragment"},
		{"https fragment", "https://host/x#frag", "query or fragment"},
		{"https query without path", "https://host?x=1", "query or fragment"},
		{"NUL", "mys3:bucket/a\x00b", "control character"},
		{"newline", "mys3:bucket/a\nb", "control character"},
		{"tab", "s3://bucket\tx", "control character"},
		{"DEL", "mys3:bucket/\x7f", "control character"},
		{"escape", "https://host/\x1b[31m", "control character"},
		{"C1 control", "mys3:bucket/a\u0085b", "control character"},
		{"right-to-left override", "mys3:bucket/model\u202enib.exe", "control character"},
		{"too long", "mys3:" + strings.Repeat("a", 2044), "the limit is 2048"},
		{"invalid UTF-8", "mys3:bucket/\xff", "UTF-8"},
		{"rclone-encoded parent", "mys3:bucket/\uff0e\uff0e/x", `".." segment`},
		{"rclone-encoded dot", "s3://bucket/\uff0e", `"." segment`},
		{"https host of dots", "https://.../x", `host "..." is invalid`},
		{"https host with empty label", "https://a..b/x", "is invalid"},
		{"https short IPv4", "https://127.1/x", "is invalid"},
		{"https decimal IPv4", "https://2130706433/x", "is invalid"},
		{"https port zero", "https://host:0/x", "is invalid"},
		{"https port out of range", "https://host:65536/x", "is invalid"},
		{"https port with leading zero", "https://host:0443/x", "is invalid"},
		{"https label too long", "https://" + strings.Repeat("a", 64) + ".com/x", "is invalid"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseURI(tc.in)
			if err == nil {
				t.Fatalf("ParseURI(%q) = %+v, want an error", tc.in, got)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseURI(%q) error %v is not ErrInvalid", tc.in, err)
			}
			if got != (URI{}) {
				t.Errorf("ParseURI(%q) returned %+v with its error, want the zero URI", tc.in, got)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("ParseURI(%q) error %q does not say %q", tc.in, err, tc.wantMsg)
			}
			if !strings.Contains(err.Error(), formsHelp) {
				t.Errorf("ParseURI(%q) error %q does not list the valid forms", tc.in, err)
			}
		})
	}
}

// A modelUri that carries credentials is rejected without repeating them:
// the message reaches kubelet events and logs (the "secrets stay in memory" invariant).
func TestParseURIDoesNotEchoCredentials(t *testing.T) {
	const secret = "SUPERSECRETVALUE123"
	for _, in := range []string{
		":s3,secret_access_key=" + secret + ":bucket",
		"mys3,secret_access_key=" + secret + ":bucket/model",
		"mys3,secret_access_key=" + secret + ":bucket/a://b",
		"https://user:" + secret + "@host/model",
		"https://" + secret + "@host/model",
		"https://host/model?X-Amz-Signature=" + secret,
		"https://host?sig=" + secret,
		"https://host/model#" + secret,
		"https://user:" + secret + "@host/model?x=" + secret,
	} {
		t.Run(in, func(t *testing.T) {
			_, err := ParseURI(in)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseURI(%q) error = %v, want ErrInvalid", in, err)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("ParseURI(%q) error repeats the credential: %q", in, err)
			}
		})
	}
}

func TestURIStringPerScheme(t *testing.T) {
	tests := []struct {
		u    URI
		want string
	}{
		{URI{Scheme: SchemeRemote, Remote: "r", Path: "b/p"}, "r:b/p"},
		{URI{Scheme: SchemeS3, Path: "b/p"}, "s3://b/p"},
		{URI{Scheme: SchemeGCS, Path: "b/p"}, "gs://b/p"},
		{URI{Scheme: SchemeHTTPS, Host: "h:1", Path: "p"}, "https://h:1/p"},
	}
	for _, tc := range tests {
		if got := tc.u.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.u, got, tc.want)
		}
	}
}

// TestURIWithin: a prefix holds only what is under it on whole segments,
// compared as the node reaches it.
func TestURIWithin(t *testing.T) {
	tests := []struct {
		uri, prefix string
		want        bool
	}{
		{"mys3:models/a", "mys3:models/a", true},
		{"mys3:models/a/b", "mys3:models/a", true},
		{"mys3:models/a/b/c.bin", "mys3:models", true},
		{"mys3:/models/a/", "mys3:models/a", true},
		{"MYS3:models/a/b", "mys3:models/a", true},
		{"my_s3:models/a/b", "my-s3:models/a", true},
		{"mys3:models/ab", "mys3:models/a", false},
		{"mys3:models/a.bak", "mys3:models/a", false},
		{"mys3:models", "mys3:models/a", false},
		{"mys3:Models/a", "mys3:models/a", false},
		{"mys3eu:models/a", "mys3:models/a", false},
		{"other:models/a", "mys3:models/a", false},
		{"s3://models/a", "mys3:models/a", false},
		{"s3://models/a/x", "s3://models/a", true},
		{"gs://models/a/x", "s3://models/a", false},
		{"s3://models-private/x", "s3://models", false},
		{"https://Models.Example.com/m/x", "https://models.example.com/m", true},
		{"https://models.example.com:443/m/x", "https://models.example.com/m", true},
		{"https://models.example.com:8443/m/x", "https://models.example.com/m", false},
		{"https://models.example.com.evil.io/m/x", "https://models.example.com/m", false},
		{"https://models.example.com/mx", "https://models.example.com/m", false},
		{"hf://org/m@v2", "hf://org/m", true},
		{"hf://org/m", "hf://org", true},
		{"hf://org2/m", "hf://org", false},
		{"oci://R.example.com/models/a:v1", "oci://r.example.com/models", true},
		{"oci://r.example.com/models/a:v1", "oci://q.example.com/models", false},
		{"oci://r.example.com/models/a:v1", "hf://models/a", false},
	}
	for _, tc := range tests {
		t.Run(tc.uri+" in "+tc.prefix, func(t *testing.T) {
			u, err := ParseURI(tc.uri)
			if err != nil {
				t.Fatal(err)
			}
			p, err := ParseURI(tc.prefix)
			if err != nil {
				t.Fatal(err)
			}
			if got := u.Within(p); got != tc.want {
				t.Errorf("%q.Within(%q) = %v, want %v", tc.uri, tc.prefix, got, tc.want)
			}
		})
	}
}
