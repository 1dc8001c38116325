package peer_test

import (
	"context"
	"errors"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/klogtest"
	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/prometheus/client_golang/prometheus/testutil"
	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// reviewedPeer is a test peer whose reviewer knows tokens of other
// accounts and audiences; "invalid" it does not know: not authenticated.
func reviewedPeer(t *testing.T) (*testPeer, string) {
	p := startPeer(t, peer.Config{})
	p.rev.set("other-account", peer.Identity{Authenticated: true, Username: "system:serviceaccount:tenant:default", Audiences: []string{peer.Audience}})
	p.rev.set("other-namespace", peer.Identity{Authenticated: true, Username: "system:serviceaccount:tenant:" + pluginSA, Audiences: []string{peer.Audience}})
	p.rev.set("wrong-audience", peer.Identity{Authenticated: true, Username: pluginUser, Audiences: []string{"https://kubernetes.default.svc"}})
	p.rev.set("no-audience", peer.Identity{Authenticated: true, Username: pluginUser})
	p.rev.set("a-user", peer.Identity{Authenticated: true, Username: "alice", Audiences: []string{peer.Audience}})
	return p, p.blobs.put(t, []byte("bytes"))
}

// TestGate_Statuses: only a token the review shows is the node plugin's,
// for the peer audience, is served: 401 for no or an invalid token, 403
// for another account's, 503 when the API server cannot say. Every path
// is gated, known or not.
func TestGate_Statuses(t *testing.T) {
	p, sum := reviewedPeer(t)
	failing := startPeer(t, peer.Config{})
	failing.rev.err = errors.New("apiserver unreachable")
	failing.blobs.put(t, []byte("bytes"))

	tests := []struct {
		name   string
		p      *testPeer
		header string // Authorization
		path   string
		status int
		reason string
		review bool // the reviewer was asked
	}{
		{name: "plugin", header: "Bearer " + pluginToken, status: 200, review: true},
		{name: "plugin, lower-case scheme", header: "bearer " + pluginToken, status: 200},
		{name: "no header", status: 401, reason: "no_token"},
		{name: "empty bearer", header: "Bearer ", status: 401, reason: "no_token"},
		{name: "basic", header: "Basic " + pluginToken, status: 401, reason: "no_token"},
		{name: "huge token", header: "Bearer " + strings.Repeat("x", 20<<10), status: 401, reason: "no_token"},
		{name: "invalid", header: "Bearer invalid", status: 401, reason: "invalid_token", review: true},
		{name: "wrong audience", header: "Bearer wrong-audience", status: 401, reason: "invalid_token", review: true},
		{name: "no audience", header: "Bearer no-audience", status: 401, reason: "invalid_token", review: true},
		{name: "other account", header: "Bearer other-account", status: 403, reason: "other_account", review: true},
		{name: "same name, other namespace", header: "Bearer other-namespace", status: 403, reason: "other_account", review: true},
		{name: "a user", header: "Bearer a-user", status: 403, reason: "other_account", review: true},
		{name: "unknown path needs a token too", header: "", path: "/nothing", status: 401, reason: "no_token"},
		{name: "unknown path", header: "Bearer " + pluginToken, path: "/nothing", status: 404},
		{name: "object lookup needs a token", path: peer.ObjectsPath + "sha256:" + strings.Repeat("1", 64), status: 401, reason: "no_token"},
		{name: "review fails", p: failing, header: "Bearer " + pluginToken, status: 503, reason: "review_failed", review: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tp := tt.p
			if tp == nil {
				tp = p
			}
			path := tt.path
			if path == "" {
				path = peer.BlobsPath + sum
			}
			var refusedBefore float64
			if tt.reason != "" {
				refusedBefore = testutil.ToFloat64(tp.metrics.RefusalsFor(tt.reason))
			}
			token := strings.TrimPrefix(strings.TrimPrefix(tt.header, "Bearer "), "bearer ")
			reviews := tp.rev.callsFor(token)
			h := map[string]string{}
			if tt.header != "" {
				h["Authorization"] = tt.header
			}
			got := tp.do(t, http.MethodGet, path, "", h)
			if got.status != tt.status {
				t.Fatalf("status %d (%q), want %d", got.status, got.body, tt.status)
			}
			if tt.status == 401 && !strings.HasPrefix(got.header.Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("401 without a Bearer challenge: %q", got.header.Get("WWW-Authenticate"))
			}
			if tt.status == 503 && got.header.Get("Retry-After") != "1" {
				t.Errorf("503 with Retry-After %q, want 1", got.header.Get("Retry-After"))
			}
			if tt.reason != "" {
				if d := testutil.ToFloat64(tp.metrics.RefusalsFor(tt.reason)) - refusedBefore; d != 1 {
					t.Errorf("refusals{reason=%s} grew by %v, want 1", tt.reason, d)
				}
			}
			if asked := tp.rev.callsFor(token) > reviews; tt.review && !asked {
				t.Error("the reviewer was not asked")
			} else if !tt.review && tt.status != 200 && asked {
				t.Error("the reviewer was asked about a request refused before review")
			}
			if tt.status != 200 && strings.Contains(got.body, "apiserver") {
				t.Errorf("the answer %q shows the review's error", got.body)
			}
		})
	}
}

// TestGate_CachesAcceptancesOnly: an accepted token is reviewed once for
// many requests; a refused one, and one whose review failed, every time.
func TestGate_CachesAcceptancesOnly(t *testing.T) {
	p := startPeer(t, peer.Config{})
	sum := p.blobs.put(t, []byte("bytes"))
	p.rev.set("other-account", peer.Identity{Authenticated: true, Username: "system:serviceaccount:x:y", Audiences: []string{peer.Audience}})
	failing := startPeer(t, peer.Config{})
	failing.rev.err = errors.New("apiserver unreachable")

	tests := []struct {
		name    string
		p       *testPeer
		token   string
		status  int
		reviews int // after two requests
	}{
		{name: "accepted", p: p, token: pluginToken, status: 200, reviews: 1},
		{name: "invalid", p: p, token: "invalid", status: 401, reviews: 2},
		{name: "other account", p: p, token: "other-account", status: 403, reviews: 2},
		{name: "review failed", p: failing, token: pluginToken, status: 503, reviews: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for i := range 2 {
				if got := tt.p.do(t, http.MethodGet, peer.BlobsPath+sum, tt.token, nil); got.status != tt.status {
					t.Fatalf("request %d: status %d, want %d", i+1, got.status, tt.status)
				}
			}
			if got := tt.p.rev.callsFor(tt.token); got != tt.reviews {
				t.Errorf("%d reviews for two requests, want %d", got, tt.reviews)
			}
		})
	}
}

// fakeClock is a settable clock for the gate's cache.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Step(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// TestGate_AcceptanceExpires: an acceptance is kept until the earlier of
// the TTL and the token's own exp, then the token is reviewed again.
func TestGate_AcceptanceExpires(t *testing.T) {
	start := time.Unix(1_800_000_000, 0)
	tests := []struct {
		name  string
		token string
		kept  time.Duration // still cached just before, reviewed again at
	}{
		{name: "expiring before the TTL", token: jwt(start.Add(10 * time.Second)), kept: 10 * time.Second},
		{name: "expiring after the TTL", token: jwt(start.Add(time.Hour)), kept: time.Minute},
		{name: "no exp claim", token: "opaque", kept: time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := &fakeClock{now: start}
			p := startPeer(t, peer.Config{CacheTTL: time.Minute, Now: clock.Now})
			sum := p.blobs.put(t, []byte("bytes"))
			p.rev.set(tt.token, pluginIdentity())
			get := func(wantReviews int) {
				t.Helper()
				if got := p.do(t, http.MethodGet, peer.BlobsPath+sum, tt.token, nil); got.status != 200 {
					t.Fatalf("status %d", got.status)
				}
				if got := p.rev.callsFor(tt.token); got != wantReviews {
					t.Fatalf("at +%s: %d reviews, want %d", clock.Now().Sub(start), got, wantReviews)
				}
			}
			get(1)
			clock.Step(tt.kept - time.Second)
			get(1)
			clock.Step(time.Second)
			get(2)
		})
	}

	t.Run("already expired", func(t *testing.T) {
		clock := &fakeClock{now: start}
		p := startPeer(t, peer.Config{Now: clock.Now})
		sum := p.blobs.put(t, []byte("bytes"))
		token := jwt(start.Add(-time.Second))
		p.rev.set(token, pluginIdentity()) // a reviewer that would say so: not cached either
		p.do(t, http.MethodGet, peer.BlobsPath+sum, token, nil)
		p.do(t, http.MethodGet, peer.BlobsPath+sum, token, nil)
		if got := p.rev.callsFor(token); got != 2 {
			t.Errorf("%d reviews, want 2: a token past its exp is never cached", got)
		}
	})
}

// TestGate_CacheIsBounded: past CacheSize tokens, the least recently used
// acceptance goes and that token is reviewed again.
func TestGate_CacheIsBounded(t *testing.T) {
	p := startPeer(t, peer.Config{CacheSize: 2})
	sum := p.blobs.put(t, []byte("bytes"))
	for _, tok := range []string{"a", "b", "c"} {
		p.rev.set(tok, pluginIdentity())
	}
	for _, tok := range []string{"a", "b", "c", "c", "b", "a"} {
		if got := p.do(t, http.MethodGet, peer.BlobsPath+sum, tok, nil); got.status != 200 {
			t.Fatalf("token %s: status %d", tok, got.status)
		}
	}
	want := map[string]int{"a": 2, "b": 1, "c": 1} // a was pushed out by c
	for tok, n := range want {
		if got := p.rev.callsFor(tok); got != n {
			t.Errorf("token %s reviewed %d times, want %d", tok, got, n)
		}
	}
}

// TestGate_NeverLogsTokens: refusals and review failures are logged
// without the token, at any verbosity.
func TestGate_NeverLogsTokens(t *testing.T) {
	logs := klogtest.Start(t, 10)
	p := startPeer(t, peer.Config{})
	sum := p.blobs.put(t, []byte("bytes"))
	const other = "other-account-token-7f3a"
	p.rev.set(other, peer.Identity{Authenticated: true, Username: "system:serviceaccount:x:y", Audiences: []string{peer.Audience}})
	failing := startPeer(t, peer.Config{})
	failing.rev.err = errors.New("apiserver unreachable")

	p.do(t, http.MethodGet, peer.BlobsPath+sum, other, nil)
	p.do(t, http.MethodGet, peer.BlobsPath+sum, "invalid-token-91bc", nil)
	p.do(t, http.MethodGet, peer.BlobsPath+sum, pluginToken+"-secret", nil)
	failing.do(t, http.MethodGet, peer.BlobsPath+sum, "failing-token-55de", nil)
	out := logs.String()
	if !strings.Contains(out, "apiserver unreachable") {
		t.Fatalf("the review failure was not logged; logs:\n%s", out)
	}
	for _, tok := range []string{other, "invalid-token-91bc", pluginToken + "-secret", "failing-token-55de"} {
		if strings.Contains(out, tok) {
			t.Errorf("the logs show token %q:\n%s", tok, out)
		}
	}
}

// TestTokenReviewer: the review asks for the peer audience alone and
// reports what the API server said; its error does not show the token.
func TestTokenReviewer(t *testing.T) {
	tests := []struct {
		name   string
		status authenticationv1.TokenReviewStatus
		err    error
		want   peer.Identity
	}{
		{name: "authenticated", status: authenticationv1.TokenReviewStatus{Authenticated: true,
			User: authenticationv1.UserInfo{Username: pluginUser}, Audiences: []string{peer.Audience}},
			want: pluginIdentity()},
		{name: "not authenticated", status: authenticationv1.TokenReviewStatus{Error: "invalid bearer token"}},
		{name: "API server fails", err: errors.New("connection refused")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kube := fake.NewClientset()
			var sent *authenticationv1.TokenReview
			kube.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
				sent = a.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview)
				if tt.err != nil {
					return true, nil, tt.err
				}
				return true, &authenticationv1.TokenReview{Spec: sent.Spec, Status: tt.status}, nil
			})
			got, err := peer.TokenReviewer{Kube: kube}.Review(context.Background(), "the-token-4c1d")
			if sent == nil || sent.Spec.Token != "the-token-4c1d" || !slices.Equal(sent.Spec.Audiences, []string{peer.Audience}) {
				t.Fatalf("sent %+v, want the token for audience %s alone", sent, peer.Audience)
			}
			if tt.err != nil {
				if err == nil || strings.Contains(err.Error(), "the-token-4c1d") {
					t.Fatalf("error %v: want one, without the token", err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Review = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}
