package testenv

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy sits between the driver and MinIO (or, started by StartProxyWith,
// any HTTP server). It counts the object bytes the remote served, can slow
// object downloads down, and can rewrite listings to play a hostile remote.
type Proxy struct {
	URL string

	// objects tells object requests (counted, throttled, delayed) from
	// the rest.
	objects func(*http.Request) bool

	objectGets  atomic.Int64
	objectBytes atomic.Int64
	objectHeads atomic.Int64
	// RateBytesPerSec, when positive, throttles each object response: a
	// per-stream cap, as one S3 or GCS stream has.
	RateBytesPerSec atomic.Int64
	// TotalBytesPerSec, when positive, caps the object bytes of all
	// responses together: the origin's egress, which every stream shares
	// (one token bucket), as a bucket's or a link's total bandwidth is.
	TotalBytesPerSec atomic.Int64
	egress           Pacer

	// served counts object bytes by object path and by client host.
	served served
	// FirstByteDelay, in nanoseconds, delays each object response's first
	// byte, as a real object store's time to first byte does, and each
	// object HEAD's answer.
	FirstByteDelay atomic.Int64

	mu      sync.Mutex
	rewrite func([]byte) []byte
	// flip: object GETs whose path ends in flipKey have the byte at
	// flipAt of their body inverted, the size left intact.
	flipKey string
	flipAt  int64
	// truncate: the next truncTimes object GETs whose path ends in
	// truncKey (every one while truncTimes < 0) are cut after truncAt
	// bytes of their body.
	truncKey   string
	truncAt    int64
	truncTimes int
	// swap: object GETs whose path ends in swapKey are answered with
	// swapData (the slice their Content-Range names) instead of the
	// remote's bytes.
	swapKey  string
	swapData []byte
	// hide: responses for objects whose path ends in hideKey carry no
	// checksum (see HideChecksums).
	hideKey string
	// trickle: object GETs from byte 0 of the object whose path ends in
	// trickleKey are served at trickleRate bytes a second (see Trickle).
	trickleKey  string
	trickleRate int64

	truncations atomic.Int64
	trickles    atomic.Int64
	// inFlight counts object GETs and HEADs being answered; maxInFlight
	// is its high-water mark since the last Reset.
	inFlight    atomic.Int64
	maxInFlight atomic.Int64

	srv *http.Server
}

// StartProxy proxies loopback traffic to target (an http:// URL of MinIO):
// its object requests are S3's path-style ones, /bucket/key.
func StartProxy(target string) (*Proxy, error) {
	return StartProxyWith(target, ProxyOptions{})
}

// ProxyOptions adapt a proxy to the server behind it.
type ProxyOptions struct {
	// Objects tells the requests whose responses the proxy counts
	// (ObjectBytes, ObjectGets, ObjectHeads), throttles (RateBytesPerSec)
	// and delays (FirstByteDelay), by their method and path. nil: S3's
	// path-style object requests (/bucket/key), as StartProxy has it.
	// AllRequests makes every request one, as for a server whose every
	// answer crosses the same network (a Hub's API, a registry's).
	Objects func(*http.Request) bool
	// Listener, when set, is where the proxy serves (one opened in a
	// test's network namespace, say); nil: a new loopback port. The proxy
	// closes it on Stop.
	Listener net.Listener
}

// AllRequests is a ProxyOptions.Objects for which every request is one.
func AllRequests(*http.Request) bool { return true }

// StartProxyWith proxies loopback traffic to target (an http:// URL) with
// opt. URLs of target in the Location, Link and WWW-Authenticate headers
// of its answers name the proxy instead, as a reverse proxy rewrites them
// (Apache's ProxyPassReverse): a redirect, the next page of a listing or a
// registry's token service is then reached through the proxy too.
func StartProxyWith(target string, opt ProxyOptions) (*Proxy, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	l := opt.Listener
	if l == nil {
		if l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return nil, err
		}
	}
	p := &Proxy{URL: "http://" + l.Addr().String(), objects: opt.Objects}
	if p.objects == nil {
		p.objects = isObjectPath
	}
	own := u.Scheme + "://" + u.Host
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1
	rp.ModifyResponse = func(resp *http.Response) error {
		for _, h := range []string{"Location", "Link", "WWW-Authenticate"} {
			if v := resp.Header.Get(h); strings.Contains(v, own) {
				resp.Header.Set(h, strings.ReplaceAll(v, own, p.URL))
			}
		}
		p.swapBody(resp)
		p.hideChecksums(resp)
		if (p.RateBytesPerSec.Load() > 0 || p.TotalBytesPerSec.Load() > 0 || p.trickleRateOf(resp.Request) > 0) && p.isObjectGet(resp.Request) {
			// Throttling plays a slow network between the driver and the
			// remote; the remote itself answers at once. Reading its answer
			// ahead keeps MinIO from cutting a connection its client drains
			// slowly, which is not what a throttled test is about, without
			// delaying the first byte by the time a whole body takes.
			resp.Body = newReadAhead(resp.Body)
		}
		p.mu.Lock()
		rw, hide := p.rewrite, p.hideKey
		p.mu.Unlock()
		if rw == nil && hide == "" || !isList(resp.Request) {
			return nil
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		if hide != "" {
			body = hideListedETag(body, hide)
		}
		if rw != nil {
			body = rw(body)
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
		resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
		return nil
	}
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.isObjectHead(r) {
			p.objectHeads.Add(1)
			// Counted in flight as GETs are: a HEAD holds a connection too.
			hw := &countingWriter{ResponseWriter: w, p: p, head: true}
			hw.enter()
			defer hw.leave()
			if d := time.Duration(p.FirstByteDelay.Load()); d > 0 {
				time.Sleep(d)
			}
		}
		if p.isObjectGet(r) {
			p.objectGets.Add(1)
			cw := &countingWriter{ResponseWriter: w, p: p, start: time.Now(), flipAt: -1, truncAt: -1, length: -1, trickle: p.trickleRateOf(r),
				object: r.URL.Path, client: clientHost(r)}
			if cw.trickle > 0 {
				p.trickles.Add(1)
			}
			p.mu.Lock()
			if p.flipKey != "" && strings.HasSuffix(r.URL.Path, "/"+p.flipKey) {
				cw.flipAt = p.flipAt
			}
			if p.truncKey != "" && p.truncTimes != 0 && strings.HasSuffix(r.URL.Path, "/"+p.truncKey) {
				cw.truncAt = p.truncAt
				if p.truncTimes > 0 {
					p.truncTimes--
				}
			}
			p.mu.Unlock()
			cw.enter()
			defer cw.leave()
			w = cw
		}
		rp.ServeHTTP(w, r)
	})}
	go p.srv.Serve(l)
	return p, nil
}

// Stop closes the proxy.
func (p *Proxy) Stop() { _ = p.srv.Close() }

// ObjectBytes is the number of object bytes served so far.
func (p *Proxy) ObjectBytes() int64 { return p.objectBytes.Load() }

// ObjectGets is the number of object GET requests so far.
func (p *Proxy) ObjectGets() int64 { return p.objectGets.Load() }

// ObjectHeads is the number of object HEAD requests so far.
func (p *Proxy) ObjectHeads() int64 { return p.objectHeads.Load() }

// ObjectBytesOf is the number of bytes served so far of the object whose
// path (/bucket/key for S3) is path.
func (p *Proxy) ObjectBytesOf(path string) int64 { return p.served.get(&p.served.byObject, path) }

// ObjectBytesTo is the number of object bytes served so far to clients
// connecting from host (an IP address): what one node fetched from the
// origin, when each node has its own address.
func (p *Proxy) ObjectBytesTo(host string) int64 { return p.served.get(&p.served.byClient, host) }

// Reset zeroes the counters, and sets the high-water mark of MaxInFlight
// to the number of object GETs in flight now (0 when idle).
func (p *Proxy) Reset() {
	p.served.reset()
	p.objectBytes.Store(0)
	p.objectGets.Store(0)
	p.objectHeads.Store(0)
	p.truncations.Store(0)
	p.trickles.Store(0)
	p.maxInFlight.Store(p.inFlight.Load())
}

// MaxInFlight is the most object GETs and HEADs the proxy was answering at
// once since it started or was Reset. A HEAD counts until its handler
// returns; a GET counts from its arrival until the last
// byte of its body is handed to the connection (or it fails): not until
// its handler returns, because throttling sleeps after the last write and
// the client may by then have sent its next request on another stream, so
// one client stream is never counted twice.
func (p *Proxy) MaxInFlight() int64 { return p.maxInFlight.Load() }

// Truncations is the number of responses Truncate cut since the last Reset.
func (p *Proxy) Truncations() int64 { return p.truncations.Load() }

// Trickle makes the proxy serve object GETs of the object whose key ends in
// key that start in its first TrickleSpan bytes (a whole GET, the first
// chunk of a ranged download, and every resume of either from where it was
// cut) at bytesPerSec, in small writes, as a remote would that holds a
// client's connection open by sending a byte now and then; every other
// range of it comes at once. Trickle("", 0) stops it.
func (p *Proxy) Trickle(key string, bytesPerSec int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.trickleKey, p.trickleRate = key, bytesPerSec
}

// Trickles is the number of GETs Trickle slowed since the last Reset.
func (p *Proxy) Trickles() int64 { return p.trickles.Load() }

// trickleRateOf is the rate Trickle sets for r, 0 for none.
func (p *Proxy) trickleRateOf(r *http.Request) int64 {
	p.mu.Lock()
	key, rate := p.trickleKey, p.trickleRate
	p.mu.Unlock()
	if key == "" || !p.isObjectGet(r) || !strings.HasSuffix(r.URL.Path, "/"+key) {
		return 0
	}
	if rg := r.Header.Get("Range"); rg != "" {
		first, _, _ := strings.Cut(strings.TrimPrefix(rg, "bytes="), "-")
		if n, err := strconv.ParseInt(first, 10, 64); err != nil || n >= TrickleSpan {
			return 0
		}
	}
	return rate
}

// TrickleSpan is how much of the start of an object Trickle slows: one
// ranged chunk of the driver's.
const TrickleSpan = 4 << 20

// Truncate makes the proxy cut responses for the object whose key ends in
// key: each of the next times object GETs of it (every one while times is
// negative) gets at bytes of its body, counted from the start of that
// response's body (a ranged GET's too), and then the connection is
// aborted, its Content-Length unmet, as a remote or middlebox dropping a
// connection would. at must be positive (a cut before the first byte is a
// failed request, which the client's own retries hide). A GET whose body is
// no longer than at is served whole but still uses up one of times.
// Truncate("", 0, 0) stops it; the count restarts at every call.
func (p *Proxy) Truncate(key string, at int64, times int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.truncKey, p.truncAt, p.truncTimes = key, at, times
}

// ServeBytesOf makes the proxy answer object GETs of the object whose key
// ends in key with data instead of the remote's bytes, status and headers
// (ETag, Content-Length) left as the remote sent them: a remote or cache
// serving another object of the same size. A ranged GET gets the slice of
// data its Content-Range names, so parallel chunks stay consistent with
// each other. data should be as long as the object; "" stops it.
func (p *Proxy) ServeBytesOf(key string, data []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.swapKey, p.swapData = key, data
}

// swapBody applies ServeBytesOf to a remote's response.
func (p *Proxy) swapBody(resp *http.Response) {
	p.mu.Lock()
	key, data := p.swapKey, p.swapData
	p.mu.Unlock()
	if key == "" || !p.isObjectGet(resp.Request) || !strings.HasSuffix(resp.Request.URL.Path, "/"+key) ||
		resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent {
		return
	}
	start, end := int64(0), int64(len(data))-1
	if cr := resp.Header.Get("Content-Range"); cr != "" {
		// bytes first-last/complete
		var total int64
		if _, err := fmt.Sscanf(cr, "bytes %d-%d/%d", &start, &end, &total); err != nil {
			return
		}
	}
	start = min(max(start, 0), int64(len(data)))
	end = min(max(end, start-1), int64(len(data))-1)
	resp.Body.Close()
	body := data[start : end+1]
	resp.Body = io.NopCloser(bytes.NewReader(body))
	resp.ContentLength = int64(len(body))
	resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
}

// HideChecksums makes every response about the object whose key ends in
// key carry no checksum: HEADs and GETs no x-amz-checksum-* headers and an
// opaque ETag, listings the same opaque ETag, as from a store whose ETags
// are not MD5s. "" stops it.
func (p *Proxy) HideChecksums(key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.hideKey = key
}

func (p *Proxy) hideChecksums(resp *http.Response) {
	p.mu.Lock()
	key := p.hideKey
	p.mu.Unlock()
	if key == "" || !strings.HasSuffix(resp.Request.URL.Path, "/"+key) {
		return
	}
	for h := range resp.Header {
		if strings.HasPrefix(strings.ToLower(h), "x-amz-checksum-") {
			resp.Header.Del(h)
		}
	}
	if resp.Header.Get("ETag") != "" {
		resp.Header.Set("ETag", `"opaque"`)
	}
}

// hideListedETag gives the listed object whose key ends in key the opaque
// ETag its HEADs and GETs carry (see HideChecksums).
func hideListedETag(body []byte, key string) []byte {
	re := regexp.MustCompile(`(?s)(<Key>[^<]*` + regexp.QuoteMeta("/"+key) + `</Key>.*?<ETag>)[^<]*(</ETag>)`)
	return re.ReplaceAll(body, []byte("${1}&#34;opaque&#34;${2}"))
}

// RewriteListings sets a function applied to every listing response body
// (nil to stop rewriting).
func (p *Proxy) RewriteListings(f func([]byte) []byte) {
	p.mu.Lock()
	p.rewrite = f
	p.mu.Unlock()
}

// RenameKey returns a listing rewrite that makes key from appear as key to.
func RenameKey(from, to string) func([]byte) []byte {
	return func(b []byte) []byte {
		return bytes.ReplaceAll(b, []byte("<Key>"+from+"</Key>"), []byte("<Key>"+to+"</Key>"))
	}
}

// isObjectGet tells object downloads from the other requests: for S3,
// /bucket/key versus /bucket?list-type=2.
func (p *Proxy) isObjectGet(r *http.Request) bool {
	return r.Method == http.MethodGet && p.objects(r)
}

func (p *Proxy) isObjectHead(r *http.Request) bool {
	return r.Method == http.MethodHead && p.objects(r)
}

// isObjectPath is S3's path-style object request: /bucket/key.
func isObjectPath(r *http.Request) bool { return strings.Contains(strings.Trim(r.URL.Path, "/"), "/") }

func isList(r *http.Request) bool {
	return r.Method == http.MethodGet && !isObjectPath(r) && r.URL.Query().Has("list-type")
}

// FlipByte makes the proxy corrupt one byte of every response for the
// object whose key ends in key, at offset at of its body, keeping its size
// (a misbehaving network or middlebox on plain http); "" stops it.
func (p *Proxy) FlipByte(key string, at int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.flipKey, p.flipAt = key, at
}

type countingWriter struct {
	http.ResponseWriter
	p       *Proxy
	start   time.Time
	n       int64
	flipAt  int64 // -1: serve the bytes as they are
	truncAt int64 // -1: serve the whole body
	length  int64 // the body's Content-Length, read at the first write; -1: not yet or unknown
	trickle int64 // bytes a second; 0: as fast as the remote
	head    bool  // a HEAD, counted in flight only
	left    bool  // no longer counted in flight
	object  string
	client  string
}

// count adds n bytes written to the proxy's counters.
func (c *countingWriter) count(n int) {
	c.n += int64(n)
	c.p.objectBytes.Add(int64(n))
	c.p.served.add(c.object, c.client, int64(n))
}

// enter counts the response in flight and raises the high-water mark.
func (c *countingWriter) enter() {
	n := c.p.inFlight.Add(1)
	for {
		m := c.p.maxInFlight.Load()
		if n <= m || c.p.maxInFlight.CompareAndSwap(m, n) {
			return
		}
	}
}

// leave stops counting the response in flight, once.
func (c *countingWriter) leave() {
	if !c.left {
		c.left = true
		c.p.inFlight.Add(-1)
	}
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if c.n == 0 {
		if d := time.Duration(c.p.FirstByteDelay.Load()); d > 0 {
			time.Sleep(d)
			c.start = time.Now()
		}
		if l, err := strconv.ParseInt(c.Header().Get("Content-Length"), 10, 64); err == nil {
			c.length = l
		}
	}
	if c.flipAt >= c.n && c.flipAt < c.n+int64(len(b)) {
		b = bytes.Clone(b)
		b[c.flipAt-c.n] ^= 0xff
	}
	if c.truncAt >= 0 && c.n+int64(len(b)) > c.truncAt {
		c.cut(b[:c.truncAt-c.n])
	}
	if c.length >= 0 && c.n+int64(len(b)) >= c.length {
		// The last bytes: the client may ask again as soon as it has them.
		c.leave()
	}
	if c.trickle > 0 {
		return c.trickleWrite(b)
	}
	if total := c.p.TotalBytesPerSec.Load(); total > 0 {
		c.p.egress.Take(int64(len(b)), total)
	}
	n, err := c.ResponseWriter.Write(b)
	c.count(n)
	if rate := c.p.RateBytesPerSec.Load(); rate > 0 {
		want := time.Duration(float64(c.n) / float64(rate) * float64(time.Second))
		if d := want - time.Since(c.start); d > 0 {
			time.Sleep(d)
		}
	}
	return n, err
}

// trickleWrite sends b a tenth of the trickle rate every 100 ms, until
// the client goes away.
func (c *countingWriter) trickleWrite(b []byte) (int, error) {
	step := max(c.trickle/10, 1)
	sent := 0
	for sent < len(b) {
		k := min(int64(len(b)-sent), step)
		n, err := c.ResponseWriter.Write(b[sent : sent+int(k)])
		sent += n
		c.count(n)
		c.Flush()
		if err != nil {
			return sent, err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return sent, nil
}

// cut sends b, the last bytes before a Truncate point, and aborts the
// connection.
func (c *countingWriter) cut(b []byte) {
	if len(b) > 0 {
		n, _ := c.ResponseWriter.Write(b)
		c.count(n)
	}
	c.Flush()
	c.p.truncations.Add(1)
	c.leave()
	panic(http.ErrAbortHandler)
}

func (c *countingWriter) Flush() {
	if f, ok := c.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// readAhead drains a response body as fast as the remote sends it into
// memory, while its reader takes the bytes at its own pace.
type readAhead struct {
	src  io.ReadCloser
	mu   sync.Mutex
	cond *sync.Cond
	buf  []byte
	err  error // io.EOF once src is drained
	done bool  // closed by the reader
}

func newReadAhead(src io.ReadCloser) *readAhead {
	r := &readAhead{src: src}
	r.cond = sync.NewCond(&r.mu)
	go r.fill()
	return r
}

func (r *readAhead) fill() {
	chunk := make([]byte, 1<<20)
	for {
		n, err := r.src.Read(chunk)
		r.mu.Lock()
		r.buf = append(r.buf, chunk[:n]...)
		if err != nil {
			r.err = err
		}
		stop := r.done || err != nil
		r.cond.Broadcast()
		r.mu.Unlock()
		if stop {
			r.src.Close()
			return
		}
	}
}

func (r *readAhead) Read(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.buf) == 0 && r.err == nil {
		r.cond.Wait()
	}
	if len(r.buf) == 0 {
		return 0, r.err
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	if len(r.buf) == 0 {
		r.buf = nil // let a drained body's memory go
	}
	return n, nil
}

func (r *readAhead) Close() error {
	r.mu.Lock()
	r.done = true
	r.mu.Unlock()
	return nil
}

// Pacer is a token bucket shared by every stream, without a burst: each
// write books its bytes' time after the writes booked before it and waits
// until then. The zero value is ready.
type Pacer struct {
	mu   sync.Mutex
	next time.Time
}

// Take waits until n bytes fit under rate bytes a second.
func (p *Pacer) Take(n, rate int64) {
	d := time.Duration(float64(n) / float64(rate) * float64(time.Second))
	p.mu.Lock()
	now := time.Now()
	if p.next.Before(now) {
		p.next = now
	}
	p.next = p.next.Add(d)
	until := p.next
	p.mu.Unlock()
	time.Sleep(time.Until(until))
}

// served counts object bytes by object and by client.
type served struct {
	mu       sync.Mutex
	byObject map[string]int64
	byClient map[string]int64
}

func (s *served) add(object, client string, n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byObject == nil {
		s.byObject, s.byClient = map[string]int64{}, map[string]int64{}
	}
	s.byObject[object] += n
	s.byClient[client] += n
}

func (s *served) get(m *map[string]int64, k string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return (*m)[k]
}

func (s *served) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.byObject, s.byClient = nil, nil
}

// clientHost is the address a request came from, without its port.
func clientHost(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}
