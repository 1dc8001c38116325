package remotespec

import (
	"fmt"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"
)

// Endpoint is a URL a backend will connect to, and the secret key (or
// "modelUri") it came from, for messages.
type Endpoint struct {
	Key string
	URL *url.URL
}

// Display shows an endpoint without user info, path or query: they may
// carry credentials (an Azure SAS URL's signature, say).
func (e Endpoint) Display() string {
	return (&url.URL{Scheme: e.URL.Scheme, Host: e.URL.Host}).String()
}

var (
	hostLabel    = regexp.MustCompile(`^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$`)
	numericLabel = regexp.MustCompile(`^([0-9]+|0[xX][0-9A-Fa-f]*)$`)
)

// checkHostname reports why host is not a usable DNS name, or "". A last
// label that is a number is refused: resolvers that follow inet_aton read
// "127.1", "2130706433" or "0x7f.1" as addresses.
func checkHostname(host string) string {
	name := strings.TrimSuffix(host, ".")
	if name == "" || len(name) > 253 {
		return "is not a valid host name"
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if !hostLabel.MatchString(l) {
			return "is not a valid host name"
		}
	}
	if numericLabel.MatchString(labels[len(labels)-1]) {
		return "looks like an IP address written in a non-standard form"
	}
	return ""
}

// checkPort reports whether port, when given, is a TCP port number.
func checkPort(port string) bool {
	if port == "" {
		return true
	}
	n, err := strconv.Atoi(port)
	return err == nil && n >= 1 && n <= 65535 && strconv.Itoa(n) == port
}

// ParseEndpointURL checks that value is an http(s) (or, with httpsOnly,
// https) URL with a usable host. Its messages name key, never the value,
// which may carry credentials.
func ParseEndpointURL(key, value string, httpsOnly bool) (Endpoint, error) {
	want := "an http(s) URL"
	if httpsOnly {
		want = "an https:// URL"
	}
	u, err := url.Parse(value)
	if err != nil || u.Host == "" || u.Opaque != "" || (u.Scheme != "https" && (httpsOnly || u.Scheme != "http")) {
		return Endpoint{}, fmt.Errorf("%w: endpoint in %s is not %s", ErrInvalid, key, want)
	}
	host := u.Hostname()
	if !checkPort(u.Port()) {
		return Endpoint{}, fmt.Errorf("%w: endpoint in %s has an invalid port", ErrInvalid, key)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if strings.HasPrefix(u.Host, "[") != a.Is6() {
			return Endpoint{}, fmt.Errorf("%w: endpoint in %s has an invalid host", ErrInvalid, key)
		}
		return Endpoint{Key: key, URL: u}, nil
	}
	if why := checkHostname(host); why != "" {
		return Endpoint{}, fmt.Errorf("%w: endpoint in %s: host %q %s", ErrInvalid, key, host, why)
	}
	return Endpoint{Key: key, URL: u}, nil
}
