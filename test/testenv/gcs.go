package testenv

import (
	"bytes"
	"crypto/md5"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"hash/crc32"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// GCS plays Google Cloud Storage's JSON API for one bucket, as much as
// rclone's gcs backend and the node plugin use of it: object listings,
// object metadata (with md5Hash and crc32c), and media downloads with
// ranges. It can corrupt downloads, as a misbehaving network would.
type GCS struct {
	// Endpoint is the JSON API's base URL, as rclone's gcs endpoint option
	// takes it.
	Endpoint string
	Bucket   string

	mu      sync.Mutex
	objects map[string]gcsObject
	flipKey string // media downloads of this object have one byte inverted
	flipAt  int64
	ranged  int // media downloads of part of an object
	srv     *http.Server
	base    string
}

type gcsObject struct {
	data      []byte
	updated   time.Time
	composite bool // no md5Hash, as GCS composite objects
}

// StartGCS serves an empty bucket on loopback.
func StartGCS(bucket string) (*GCS, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	g := &GCS{Bucket: bucket, objects: map[string]gcsObject{}, base: "http://" + l.Addr().String()}
	g.Endpoint = g.base + "/storage/v1/"
	g.srv = &http.Server{Handler: http.HandlerFunc(g.serve)}
	go g.srv.Serve(l)
	return g, nil
}

// Stop closes the server.
func (g *GCS) Stop() { _ = g.srv.Close() }

// Put stores an object; a composite one has a crc32c and no MD5.
func (g *GCS) Put(name string, data []byte, composite bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.objects[name] = gcsObject{data: bytes.Clone(data), updated: time.Now().UTC().Truncate(time.Millisecond), composite: composite}
}

// FlipByte inverts the byte at offset at of every media download of
// object name (counted from each response's start); "" stops it.
func (g *GCS) FlipByte(name string, at int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.flipKey, g.flipAt = name, at
}

// RangedGets is the number of media downloads of part of an object so far.
func (g *GCS) RangedGets() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.ranged
}

// resource is an object's JSON API representation.
func (g *GCS) resource(name string, o gcsObject) map[string]any {
	crc := binary.BigEndian.AppendUint32(nil, crc32.Checksum(o.data, crc32.MakeTable(crc32.Castagnoli)))
	r := map[string]any{
		"kind": "storage#object", "bucket": g.Bucket, "name": name,
		"size": strconv.Itoa(len(o.data)), "updated": o.updated.Format(time.RFC3339Nano),
		"crc32c":    base64.StdEncoding.EncodeToString(crc),
		"mediaLink": g.base + "/download/storage/v1/b/" + g.Bucket + "/o/" + url.PathEscape(name) + "?alt=media",
	}
	if !o.composite {
		sum := md5.Sum(o.data)
		r["md5Hash"] = base64.StdEncoding.EncodeToString(sum[:])
	} else {
		r["componentCount"] = 2
	}
	return r
}

func (g *GCS) serve(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	objects := "/storage/v1/b/" + g.Bucket + "/o"
	switch p := r.URL.Path; {
	case r.Method != http.MethodGet:
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	case p == objects:
		g.list(w, r)
	case strings.HasPrefix(p, objects+"/"):
		name := strings.TrimPrefix(p, objects+"/")
		o, ok := g.objects[name]
		if !ok {
			notFound(w)
			return
		}
		writeJSON(w, g.resource(name, o))
	case strings.HasPrefix(p, "/download"+objects+"/"):
		name := strings.TrimPrefix(p, "/download"+objects+"/")
		o, ok := g.objects[name]
		if !ok {
			notFound(w)
			return
		}
		if r.Header.Get("Range") != "" {
			g.ranged++
		}
		data := o.data
		if g.flipKey == name {
			data = flipRanged(data, r.Header.Get("Range"), g.flipAt)
		}
		http.ServeContent(w, r, "", o.updated, bytes.NewReader(data))
	default:
		notFound(w)
	}
}

// list answers an objects.list: every object under prefix, in one page;
// with a delimiter, the sub-directories as prefixes.
func (g *GCS) list(w http.ResponseWriter, r *http.Request) {
	prefix, delim := r.URL.Query().Get("prefix"), r.URL.Query().Get("delimiter")
	names := make([]string, 0, len(g.objects))
	for name := range g.objects {
		names = append(names, name)
	}
	sort.Strings(names)
	items, prefixes, seen := []any{}, []string{}, map[string]bool{}
	for _, name := range names {
		rest, ok := strings.CutPrefix(name, prefix)
		if !ok {
			continue
		}
		if i := strings.Index(rest, delim); delim != "" && i >= 0 {
			if p := prefix + rest[:i+1]; !seen[p] {
				seen[p] = true
				prefixes = append(prefixes, p)
			}
			continue
		}
		items = append(items, g.resource(name, g.objects[name]))
	}
	writeJSON(w, map[string]any{"kind": "storage#objects", "items": items, "prefixes": prefixes})
}

// flipRanged returns data with the byte at offset at of the response a
// Range header asks for inverted.
func flipRanged(data []byte, rangeHeader string, at int64) []byte {
	start := int64(0)
	if s, ok := strings.CutPrefix(rangeHeader, "bytes="); ok {
		if first, _, ok := strings.Cut(s, "-"); ok {
			start, _ = strconv.ParseInt(first, 10, 64)
		}
	}
	if start+at >= int64(len(data)) {
		return data
	}
	c := bytes.Clone(data)
	c[start+at] ^= 0xff
	return c
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func notFound(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusNotFound)
	_, _ = w.Write([]byte(`{"error":{"code":404,"message":"No such object"}}`))
}
