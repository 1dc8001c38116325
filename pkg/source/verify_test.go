package source

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeS3 is just enough of an S3 endpoint (path style) for rclone to list,
// stat and read objects: HEAD and GET of an object, GET of a bucket
// listing. It counts requests by method and by kind, and answers 403 to
// access keys it does not know.
type fakeS3 struct {
	t      *testing.T
	url    string
	bucket string
	delay  time.Duration // per HEAD, to observe parallelism

	mu      sync.Mutex
	objects map[string][]byte // key → body
	etags   map[string]string // overrides the MD5 ETag
	keys    map[string]bool   // access key IDs allowed to read
	counts  map[string]int    // "HEAD", "GET object", "GET list", ...

	inFlight, maxInFlight atomic.Int64
	// conns is how many client connections are open now.
	conns atomic.Int64
}

func newFakeS3(t *testing.T) *fakeS3 {
	f := &fakeS3{
		t: t, bucket: "models",
		objects: map[string][]byte{}, etags: map[string]string{},
		keys: map[string]bool{secretKeyID: true}, counts: map[string]int{},
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			f.conns.Add(1)
		case http.StateClosed, http.StateHijacked:
			f.conns.Add(-1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	f.url = srv.URL
	return f
}

func (f *fakeS3) put(key, body string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.objects[key] = []byte(body)
	delete(f.etags, key)
}

func (f *fakeS3) remove(key string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.objects, key)
}

func (f *fakeS3) setETag(key, etag string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.etags[key] = etag
}

func (f *fakeS3) allow(keyID string, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.keys[keyID] = ok
}

// take returns the request counts so far and resets them.
func (f *fakeS3) take() map[string]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.counts
	f.counts = map[string]int{}
	return c
}

func (f *fakeS3) etag(key string) string {
	if e, ok := f.etags[key]; ok {
		return e
	}
	sum := md5.Sum(f.objects[key])
	return `"` + hex.EncodeToString(sum[:]) + `"`
}

var fakeModTime = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

func (f *fakeS3) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodHead {
		n := f.inFlight.Add(1)
		defer f.inFlight.Add(-1)
		for {
			m := f.maxInFlight.Load()
			if n <= m || f.maxInFlight.CompareAndSwap(m, n) {
				break
			}
		}
		time.Sleep(f.delay)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	bucket, key, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	kind := r.Method
	if r.Method == http.MethodGet {
		kind = "GET object"
		if key == "" {
			kind = "GET list"
		}
	}
	f.counts[kind]++

	auth := r.Header.Get("Authorization")
	_, cred, _ := strings.Cut(auth, "Credential=")
	keyID, _, _ := strings.Cut(cred, "/")
	if !f.keys[keyID] {
		w.Header().Set("Content-Type", "application/xml")
		w.WriteHeader(http.StatusForbidden)
		if r.Method != http.MethodHead {
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>`)
		}
		return
	}
	if bucket != f.bucket {
		w.WriteHeader(http.StatusNotFound)
		if r.Method != http.MethodHead {
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchBucket</Code><Message>no such bucket</Message></Error>`)
		}
		return
	}
	if key == "" {
		f.list(w, r)
		return
	}
	body, ok := f.objects[key]
	if !ok {
		w.WriteHeader(http.StatusNotFound)
		if r.Method != http.MethodHead {
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>`)
		}
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set("ETag", f.etag(key))
	w.Header().Set("Last-Modified", fakeModTime.Format(http.TimeFormat))
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(body)
	}
}

type listContents struct {
	Key          string `xml:"Key"`
	LastModified string `xml:"LastModified"`
	ETag         string `xml:"ETag"`
	Size         int    `xml:"Size"`
	StorageClass string `xml:"StorageClass"`
}

type listResult struct {
	XMLName     xml.Name       `xml:"http://s3.amazonaws.com/doc/2006-03-01/ ListBucketResult"`
	Name        string         `xml:"Name"`
	Prefix      string         `xml:"Prefix"`
	KeyCount    int            `xml:"KeyCount"`
	MaxKeys     int            `xml:"MaxKeys"`
	IsTruncated bool           `xml:"IsTruncated"`
	Contents    []listContents `xml:"Contents"`
}

func (f *fakeS3) list(w http.ResponseWriter, r *http.Request) {
	prefix := r.URL.Query().Get("prefix")
	res := listResult{Name: f.bucket, Prefix: prefix, MaxKeys: 1000}
	for key, body := range f.objects {
		if strings.HasPrefix(key, prefix) {
			res.Contents = append(res.Contents, listContents{
				Key: key, LastModified: fakeModTime.Format("2006-01-02T15:04:05.000Z"),
				ETag: f.etag(key), Size: len(body), StorageClass: "STANDARD",
			})
		}
	}
	slices.SortFunc(res.Contents, func(a, b listContents) int { return strings.Compare(a.Key, b.Key) })
	res.KeyCount = len(res.Contents)
	w.Header().Set("Content-Type", "application/xml")
	_, _ = fmt.Fprint(w, xml.Header)
	if err := xml.NewEncoder(w).Encode(res); err != nil {
		f.t.Errorf("fake S3: encoding listing: %v", err)
	}
}

// resolveFake resolves uri on the fake S3 with the access key keyID.
func (f *fakeS3) resolve(t *testing.T, uri, keyID string, extra ...string) Remote {
	t.Helper()
	r, _ := newTestRclone(t, nil, WithAllowedEndpoints(loopback))
	secrets := with(minioSecret(f.url, keyID, secretAccessKey), extra...)
	remote, err := r.Resolve(context.Background(), uri, secrets)
	if err != nil {
		t.Fatalf("Resolve(%q): %v", uri, err)
	}
	return remote
}

func TestVerify(t *testing.T) {
	ctx := context.Background()
	s3 := newFakeS3(t)
	s3.put("iris/model.bin", "weights")
	s3.put("iris/config.json", `{"a":1}`)
	s3.put("iris/tokenizer/vocab.txt", "a\nb\n")
	s3.allow("AKIATENANTB0001", true)
	s3.allow("AKIATENANTC0001", false)

	lister := s3.resolve(t, "mys3:models/iris", secretKeyID)
	m, err := lister.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if len(m) != 3 || m[0].Hash == "" {
		t.Fatalf("List = %+v, want 3 entries with hashes", m)
	}
	s3.take()

	// metadataOnly fails if the Verify read an object's body. A listing
	// is metadata: rclone lists the root when it may not stat it, to tell
	// an object from a directory.
	metadataOnly := func(t *testing.T) {
		t.Helper()
		c := s3.take()
		for kind, n := range c {
			if kind != http.MethodHead && kind != "GET list" {
				t.Errorf("Verify made %d %s requests, want metadata requests only (counts %v)", n, kind, c)
			}
		}
		if c[http.MethodHead] == 0 {
			t.Errorf("Verify made no HEAD request (counts %v): it checked nothing", c)
		}
	}

	t.Run("same credentials", func(t *testing.T) {
		if err := lister.Verify(ctx, m); err != nil {
			t.Fatalf("Verify: %v", err)
		}
		c := s3.take()
		if c[http.MethodHead] != len(m) || len(c) != 1 {
			t.Errorf("Verify made requests %v, want exactly one HEAD per entry (%d)", c, len(m))
		}
	})

	t.Run("other allowed credentials", func(t *testing.T) {
		other := s3.resolve(t, "mys3:models/iris", "AKIATENANTB0001")
		if err := other.Verify(ctx, m); err != nil {
			t.Fatalf("Verify with other allowed credentials: %v", err)
		}
		metadataOnly(t)
	})

	t.Run("denied credentials", func(t *testing.T) {
		denied := s3.resolve(t, "mys3:models/iris", "AKIATENANTC0001")
		err := denied.Verify(ctx, m)
		if !errors.Is(err, ErrDenied) {
			t.Fatalf("Verify with denied credentials = %v, want ErrDenied", err)
		}
		assertNoSecrets(t, "Verify error", err.Error(), map[string]string{"k": secretAccessKey})
		metadataOnly(t)
	})

	t.Run("unknown credentials", func(t *testing.T) {
		err := s3.resolve(t, "mys3:models/iris", "AKIANOBODY000001").Verify(ctx, m)
		if !errors.Is(err, ErrDenied) {
			t.Fatalf("Verify with unknown credentials = %v, want ErrDenied", err)
		}
		metadataOnly(t)
	})

	t.Run("object gone", func(t *testing.T) {
		s3.remove("iris/config.json")
		defer s3.put("iris/config.json", `{"a":1}`)
		err := s3.resolve(t, "mys3:models/iris", secretKeyID).Verify(ctx, m)
		if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "config.json") {
			t.Fatalf("Verify with an object gone = %v, want ErrNotFound naming it", err)
		}
		metadataOnly(t)
	})

	t.Run("object resized", func(t *testing.T) {
		s3.put("iris/model.bin", "new weights")
		defer s3.put("iris/model.bin", "weights")
		err := s3.resolve(t, "mys3:models/iris", secretKeyID).Verify(ctx, m)
		if !errors.Is(err, ErrChanged) || !strings.Contains(err.Error(), "model.bin") {
			t.Fatalf("Verify with an object resized = %v, want ErrChanged naming it", err)
		}
		metadataOnly(t)
	})

	t.Run("object rewritten with the same size", func(t *testing.T) {
		s3.put("iris/model.bin", "WEIGHTS")
		defer s3.put("iris/model.bin", "weights")
		err := s3.resolve(t, "mys3:models/iris", secretKeyID).Verify(ctx, m)
		if !errors.Is(err, ErrChanged) {
			t.Fatalf("Verify with an object's ETag changed = %v, want ErrChanged", err)
		}
		metadataOnly(t)
	})

	t.Run("no checksum on either side", func(t *testing.T) {
		// A multipart ETag is no MD5: size alone decides.
		s3.setETag("iris/model.bin", `"0123456789abcdef0123456789abcdef-2"`)
		defer s3.put("iris/model.bin", "weights")
		noHash := slices.Clone(m)
		for i := range noHash {
			noHash[i].Hash = ""
		}
		if err := s3.resolve(t, "mys3:models/iris", secretKeyID).Verify(ctx, noHash); err != nil {
			t.Fatalf("Verify without checksums: %v", err)
		}
		metadataOnly(t)
	})

	t.Run("no_head_object does not skip the check", func(t *testing.T) {
		remote := s3.resolve(t, "mys3:models/iris", "AKIATENANTC0001", "RCLONE_CONFIG_MYS3_NO_HEAD_OBJECT", "true")
		if err := remote.Verify(ctx, m); !errors.Is(err, ErrDenied) {
			t.Fatalf("Verify with no_head_object and denied credentials = %v, want ErrDenied", err)
		}
		metadataOnly(t)
	})

	t.Run("single object", func(t *testing.T) {
		one := s3.resolve(t, "mys3:models/iris/model.bin", secretKeyID)
		om, err := one.List(ctx)
		if err != nil || len(om) != 1 {
			t.Fatalf("List of one object = %v, %v", om, err)
		}
		s3.take()
		if err := s3.resolve(t, "mys3:models/iris/model.bin", "AKIATENANTB0001").Verify(ctx, om); err != nil {
			t.Fatalf("Verify of one object: %v", err)
		}
		metadataOnly(t)
		if err := s3.resolve(t, "mys3:models/iris/model.bin", "AKIATENANTB0001").Verify(ctx, m); !errors.Is(err, ErrChanged) {
			t.Errorf("Verify of a single-object URI against a 3-entry manifest = %v, want ErrChanged", err)
		}
		s3.take()
	})

	t.Run("refused without a request", func(t *testing.T) {
		remote := s3.resolve(t, "mys3:models/iris", secretKeyID)
		s3.take()
		for _, tc := range []struct {
			name string
			m    Manifest
			want error
		}{
			{"nil manifest", nil, ErrInvalid},
			{"empty manifest", Manifest{}, ErrInvalid},
			{"escaping key", Manifest{m[0], {Path: "../../etc/passwd", Size: 1}}, ErrUnsafePath},
		} {
			if err := remote.Verify(ctx, tc.m); !errors.Is(err, tc.want) {
				t.Errorf("%s: Verify = %v, want %v", tc.name, err, tc.want)
			}
		}
		if c := s3.take(); len(c) != 0 {
			t.Errorf("Verify of a bad manifest made requests %v, want none", c)
		}
	})

	t.Run("cancelled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := lister.Verify(cctx, m); err == nil || !errors.Is(err, ErrUnavailable) {
			t.Errorf("Verify with a cancelled context = %v, want ErrUnavailable", err)
		}
		s3.take()
	})
}

// Verify runs at most verifyParallelism requests at once and stops at the
// first error.
func TestVerifyParallelism(t *testing.T) {
	ctx := context.Background()
	s3 := newFakeS3(t)
	s3.delay = 20 * time.Millisecond
	const n = 64
	var m Manifest
	for i := range n {
		key := fmt.Sprintf("big/shard-%03d.bin", i)
		s3.put(key, "x")
		sum := md5.Sum([]byte("x"))
		m = append(m, Entry{Path: strings.TrimPrefix(key, "big/"), Size: 1, Hash: hex.EncodeToString(sum[:])})
	}
	remote := s3.resolve(t, "mys3:models/big", secretKeyID)
	if err := remote.Verify(ctx, m); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if got := s3.maxInFlight.Load(); got > verifyParallelism || got < 2 {
		t.Errorf("Verify had up to %d HEADs in flight, want between 2 and %d", got, verifyParallelism)
	}
	if c := s3.take(); c[http.MethodHead] != n+1 || len(c) != 1 { // +1: NewFs checks whether the root is an object
		t.Errorf("Verify made requests %v, want %d HEADs", c, n+1)
	}

	s3.allow(secretKeyID, false)
	if err := s3.resolve(t, "mys3:models/big", secretKeyID).Verify(ctx, m); !errors.Is(err, ErrDenied) {
		t.Fatalf("Verify with denied credentials = %v, want ErrDenied", err)
	}
	if c := s3.take(); c[http.MethodHead] > 3*verifyParallelism {
		t.Errorf("Verify kept going after the first refusal: %d HEADs for %d entries", c[http.MethodHead], n)
	}
}
