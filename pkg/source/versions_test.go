package source

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// An object uploaded in parts has an ETag that is no MD5, which rclone
// drops: the listing names it by that ETag from a listing of its own, one
// request for the whole prefix, none per object; an object with an MD5
// keeps its MD5 and gets no version.
func TestList_MultipartETagBecomesVersion(t *testing.T) {
	const multipart = `"0123456789abcdef0123456789abcdef-3"`
	tests := []struct {
		name  string
		etags map[string]string // key → ETag, beside MD5 ETags
		want  map[string]string // path → Version
		lists int               // listings of the bucket
	}{
		{"every object single-part", nil, map[string]string{"config.json": "", "w.bin": ""}, 1},
		{"one object in parts", map[string]string{"m/w.bin": multipart},
			map[string]string{"config.json": "", "w.bin": "etag:0123456789abcdef0123456789abcdef-3"}, 2},
		{"every object in parts", map[string]string{"m/w.bin": multipart, "m/config.json": `"FEDCBA9876543210FEDCBA9876543210-2"`},
			map[string]string{"config.json": "etag:fedcba9876543210fedcba9876543210-2", "w.bin": "etag:0123456789abcdef0123456789abcdef-3"}, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s3 := newFakeS3(t)
			s3.put("m/w.bin", "weights")
			s3.put("m/config.json", "{}")
			s3.put("other/w.bin", "other weights")
			for k, v := range tt.etags {
				s3.setETag(k, v)
			}
			m, err := s3.resolve(t, "mys3:models/m", secretKeyID).List(context.Background())
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			for _, e := range m {
				if e.Version != tt.want[e.Path] {
					t.Errorf("%s has Version %q, want %q", e.Path, e.Version, tt.want[e.Path])
				}
				if (e.Version == "") == (e.Hash == "") {
					t.Errorf("%s has Hash %q and Version %q: want exactly one", e.Path, e.Hash, e.Version)
				}
			}
			c := s3.take()
			if c["GET list"] != tt.lists {
				t.Errorf("List listed the bucket %d times, want %d (counts %v)", c["GET list"], tt.lists, c)
			}
			// rclone HEADs the root (is it an object?), and its Object.Hash
			// each object without an MD5 (for the MD5 rclone stores on its
			// own uploads); the versions add no request per object.
			if want := 1 + len(tt.etags); c[http.MethodHead] != want {
				t.Errorf("List made %d HEADs, want %d: the root's and one per object without an MD5 (counts %v)", c[http.MethodHead], want, c)
			}
		})
	}
}

// A second listing that disagrees with the first on an object's size or
// time (the object changed in between) gives it no version, and a key not
// wanted is ignored.
func TestSetVersion(t *testing.T) {
	ts := time.Date(2025, 1, 2, 3, 4, 5, 678e6, time.UTC)
	tests := []struct {
		name string
		key  string
		size int64
		t    time.Time
		want string
	}{
		{"agrees", "m/a", 10, ts, "etag:x-2"},
		{"agrees to the second", "m/a", 10, ts.Truncate(time.Second), "etag:x-2"},
		{"other size", "m/a", 11, ts, ""},
		{"other time", "m/a", 10, ts.Add(time.Second), ""},
		{"not wanted", "m/b", 10, ts, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := Manifest{{Path: "a", Size: 10, ModTime: ts}}
			setVersion(m, map[string]int{"m/a": 0}, tt.key, tt.size, tt.t, "x-2", "etag:")
			if m[0].Version != tt.want {
				t.Errorf("Version = %q, want %q", m[0].Version, tt.want)
			}
		})
	}
}

func TestCommonPrefix(t *testing.T) {
	tests := []struct{ a, b, want string }{
		{"", "", ""}, {"m/a", "m/b", "m/"}, {"m/a", "m/a", "m/a"}, {"m/ab", "m/a", "m/a"}, {"x", "y", ""},
	}
	for _, tt := range tests {
		if got := commonPrefix(tt.a, tt.b); got != tt.want {
			t.Errorf("commonPrefix(%q, %q) = %q, want %q", tt.a, tt.b, got, tt.want)
		}
	}
}

// GCS lists no MD5 for a composite object: it is named by its generation,
// from one listing of the prefix.
func TestList_GCSCompositeObjectNamedByGeneration(t *testing.T) {
	md5b64 := "ASNFZ4mrze8BI0VniavN7w==" // 0123456789abcdef0123456789abcdef
	items := []map[string]any{
		{"name": "m/composite.bin", "size": "1048576", "updated": "2025-01-02T03:04:05.678Z", "generation": "1700000000000001"},
		{"name": "m/w.bin", "size": "100", "updated": "2025-01-02T03:04:05.678Z", "generation": "1700000000000002", "md5Hash": md5b64},
	}
	var lists atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path != "/storage/v1/b/bucket/o" {
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"error":{"code":404,"message":"No such object"}}`))
			return
		}
		lists.Add(1)
		_ = json.NewEncoder(w).Encode(map[string]any{"kind": "storage#objects", "items": items})
	}))
	t.Cleanup(srv.Close)
	r, _ := newTestRclone(t, nil, WithAllowedEndpoints(loopback))
	remote, err := r.Resolve(context.Background(), "mygcs:bucket/m", map[string]string{
		"RCLONE_CONFIG_MYGCS_TYPE": "google cloud storage", "RCLONE_CONFIG_MYGCS_ENDPOINT": srv.URL + "/storage/v1/",
	})
	if err != nil {
		t.Fatal(err)
	}
	m, err := remote.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	want := map[string]string{"composite.bin": "generation:1700000000000001", "w.bin": ""}
	if len(m) != len(want) {
		t.Fatalf("List = %+v, want %d entries", m, len(want))
	}
	for _, e := range m {
		if e.Version != want[e.Path] {
			t.Errorf("%s has Version %q, want %q (Hash %q)", e.Path, e.Version, want[e.Path], e.Hash)
		}
	}
	if n := lists.Load(); n != 2 {
		t.Errorf("the bucket was listed %d times, want 2 (rclone's walk and one for the versions)", n)
	}
}

// A HEAD that finds another ETag than the one an object was listed with
// (keyed by) says the object changed: its partial download and its blob
// belong to the listed version only.
func TestChecksum_OtherETagThanListedIsChanged(t *testing.T) {
	const listed = "0123456789abcdef0123456789abcdef-3"
	tests := []struct {
		name    string
		now     string
		wantErr error
	}{
		{"same ETag", `"` + listed + `"`, nil},
		{"same ETag, upper case", `"` + strings.ToUpper(listed) + `"`, nil},
		{"uploaded again", `"fedcba9876543210fedcba9876543210-3"`, ErrChanged},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s3 := newFakeS3(t)
			s3.put("m/w.bin", "weights")
			s3.setETag("m/w.bin", tt.now)
			remote := s3.resolve(t, "mys3:models/m", secretKeyID)
			e := Entry{Path: "w.bin", Size: int64(len("weights")), ModTime: fakeModTime, Version: "etag:" + listed}
			_, err := remote.(Checksummer).Checksum(context.Background(), e)
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) {
				t.Fatalf("Checksum = %v, want %v", err, tt.wantErr)
			}
		})
	}
}
