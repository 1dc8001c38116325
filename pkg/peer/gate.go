package peer

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"golang.org/x/sync/singleflight"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/cache"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
)

// Identity is what a token review says of a token.
type Identity struct {
	Authenticated bool
	Username      string
	// Audiences are those of the token that the review asked for.
	Audiences []string
}

// Reviewer says whose a bearer token is. TokenReviewer asks the API
// server; tests fake it.
type Reviewer interface {
	Review(ctx context.Context, token string) (Identity, error)
}

// TokenReviewer reviews tokens with the API server's TokenReview, for the
// audience Audience alone. Its account needs create on tokenreviews.
type TokenReviewer struct {
	Kube kubernetes.Interface
}

// Review implements Reviewer. The token goes to the API server and
// nowhere else: not into the error, which names only the API's answer.
func (t TokenReviewer) Review(ctx context.Context, token string) (Identity, error) {
	tr := &authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: []string{Audience}}}
	got, err := t.Kube.AuthenticationV1().TokenReviews().Create(ctx, tr, metav1.CreateOptions{})
	if err != nil {
		return Identity{}, fmt.Errorf("reviewing a peer's token with the API server: %w", err)
	}
	return Identity{Authenticated: got.Status.Authenticated, Username: got.Status.User.Username, Audiences: got.Status.Audiences}, nil
}

// Refusal reasons, the values of the refusals metric's label.
const (
	reasonNoToken      = "no_token"      // no bearer token
	reasonInvalidToken = "invalid_token" // not authenticated, or not for Audience
	reasonOtherAccount = "other_account" // a valid token of another account
	reasonReviewFailed = "review_failed" // the API server could not be asked
	reasonBusy         = "busy"          // MaxStreams bodies already being served
)

var refusalReasons = []string{reasonNoToken, reasonInvalidToken, reasonOtherAccount, reasonReviewFailed, reasonBusy}

const (
	// maxTokenBytes bounds what is sent to TokenReview: projected tokens
	// are about a kilobyte.
	maxTokenBytes = 16 << 10
	// reviewTimeout bounds one TokenReview, which callers of the same
	// token share and so must not end with the first caller's request.
	reviewTimeout = 10 * time.Second
)

// gate admits requests that carry a token of the node plugin's account.
// Acceptances are cached, keyed by the token's sha256 (the token itself is
// never kept), until the earlier of the TTL and the token's expiry;
// refusals never are, so a token that becomes valid (a new account, a
// restarted API server) works at once and an attacker's guesses each cost
// a review they cannot skip.
type gate struct {
	reviewer Reviewer
	user     string
	ttl      time.Duration
	now      func() time.Time
	accepted *cache.LRUExpireCache
	reviews  singleflight.Group
}

type clockFunc func() time.Time

func (f clockFunc) Now() time.Time { return f() }

func newGate(cfg Config) *gate {
	g := &gate{
		reviewer: cfg.Reviewer,
		user:     "system:serviceaccount:" + cfg.Namespace + ":" + cfg.ServiceAccount,
		ttl:      cfg.CacheTTL,
		now:      cfg.Now,
	}
	if g.ttl <= 0 {
		g.ttl = DefaultCacheTTL
	}
	if g.now == nil {
		g.now = time.Now
	}
	size := cfg.CacheSize
	if size <= 0 {
		size = DefaultCacheSize
	}
	g.accepted = cache.NewLRUExpireCacheWithClock(size, clockFunc(g.now))
	return g
}

// admit returns 0 for a request to serve, or the status that refuses it
// and why.
func (g *gate) admit(r *http.Request) (code int, reason string) {
	token, ok := bearer(r)
	if !ok {
		return http.StatusUnauthorized, reasonNoToken
	}
	key := sha256.Sum256([]byte(token))
	// The cache keeps an entry up to and including its expiry; a token is
	// no longer valid at its exp, so the value says until when.
	if until, ok := g.accepted.Get(key); ok && g.now().Before(until.(time.Time)) {
		return 0, ""
	}
	// Concurrent requests with one token (a node's parallel ranges) share
	// one review.
	v, err, _ := g.reviews.Do(string(key[:]), func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), reviewTimeout)
		defer cancel()
		return g.reviewer.Review(ctx, token)
	})
	if err != nil {
		klog.ErrorS(err, "Cannot review a peer's token; refusing it for now", "peer", r.RemoteAddr)
		return http.StatusServiceUnavailable, reasonReviewFailed
	}
	id := v.(Identity)
	switch {
	case !id.Authenticated || !slices.Contains(id.Audiences, Audience):
		return http.StatusUnauthorized, reasonInvalidToken
	case id.Username != g.user:
		klog.V(2).InfoS("Refused a peer request from another account", "user", id.Username, "peer", r.RemoteAddr)
		return http.StatusForbidden, reasonOtherAccount
	}
	ttl := g.ttl
	if exp, ok := tokenExpiry(token); ok {
		ttl = min(ttl, exp.Sub(g.now()))
	}
	if ttl > 0 {
		g.accepted.Add(key, g.now().Add(ttl), ttl)
	}
	return 0, ""
}

// bearer is the request's bearer token, if it has one of a sane size.
func bearer(r *http.Request) (string, bool) {
	h := r.Header.Values("Authorization")
	if len(h) != 1 {
		return "", false
	}
	scheme, token, ok := strings.Cut(h[0], " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" || len(token) > maxTokenBytes {
		return "", false
	}
	return token, true
}

// tokenExpiry reads the exp claim of a JWT without checking its signature:
// it only shortens how long an acceptance the API server gave is kept,
// never makes a token acceptable.
func tokenExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp *json.Number `json:"exp"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil || claims.Exp == nil {
		return time.Time{}, false
	}
	exp, err := claims.Exp.Float64()
	if err != nil || exp <= 0 || exp > 1<<40 {
		return time.Time{}, false
	}
	return time.Unix(int64(exp), 0), true
}
