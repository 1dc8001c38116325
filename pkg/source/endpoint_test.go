package source

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/modelcache/modelcache/pkg/egress"
)

var loopback = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}

// fakeDNS answers lookups from a table and never touches the network;
// unknown names do not exist.
type fakeDNS struct {
	hosts map[string][]string

	mu      sync.Mutex
	lookups []string
}

func (d *fakeDNS) LookupNetIP(ctx context.Context, _, host string) ([]netip.Addr, error) {
	d.mu.Lock()
	d.lookups = append(d.lookups, host)
	d.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if host == "timeout.example" {
		return nil, &net.DNSError{Err: "i/o timeout", Name: host, IsTimeout: true}
	}
	ips, ok := d.hosts[strings.TrimSuffix(host, ".")]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	out := make([]netip.Addr, 0, len(ips))
	for _, ip := range ips {
		out = append(out, netip.MustParseAddr(ip))
	}
	return out, nil
}

func (d *fakeDNS) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.lookups)
}

// nodeAddr is the node's own address in tests that fake the interfaces.
const nodeAddr = "10.0.0.7"

// newTestRclone returns a resolver whose DNS answers come from hosts and
// whose node has the interfaces lo (127.0.0.1, ::1) and eth0 (nodeAddr,
// fe80::1): no test reaches real DNS through it.
func newTestRclone(t *testing.T, hosts map[string][]string, opts ...Option) (*Sources, *fakeDNS) {
	t.Helper()
	dns := &fakeDNS{hosts: hosts}
	r := NewSources([]byte("node key"), opts...)
	r.resolver = dns
	r.interfaceAddrs = func() ([]net.Addr, error) {
		var out []net.Addr
		for _, c := range []string{"127.0.0.1/8", "::1/128", nodeAddr + "/24", "fe80::1/64"} {
			ip, n, err := net.ParseCIDR(c)
			if err != nil {
				t.Fatal(err)
			}
			n.IP = ip
			out = append(out, n)
		}
		return out, nil
	}
	return r, dns
}

// The endpoint guard: a tenant's endpoint may not reach the node itself.
func TestResolveEndpointGuard(t *testing.T) {
	hosts := map[string][]string{
		"metadata.google.internal": {"169.254.169.254"},
		"mixed.example":            {"93.184.215.14", "127.0.0.1"},
		"minio.example":            {"93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"},
		"node.example":             {nodeAddr},
		"imds6.example":            {"fd00:ec2::254"},
		"mapped.example":           {"::ffff:127.0.0.1"},
		"zero.example":             {"0.1.2.3"},
		"cluster.example":          {"10.96.0.20"},
	}
	s3Remote := func(ep string) (string, map[string]string) {
		return "mys3:bucket/m", minioSecret(ep, secretKeyID, secretAccessKey)
	}
	awsForm := func(ep string) (string, map[string]string) {
		return "s3://bucket/m", map[string]string{"AWS_ENDPOINT_URL": ep}
	}
	kserveForm := func(ep string) (string, map[string]string) {
		return "s3://bucket/m", map[string]string{"S3_ENDPOINT": ep, "S3_USE_HTTPS": "0"}
	}
	httpsForm := func(host string) (string, map[string]string) { return "https://" + host + "/m", nil }
	httpRemote := func(ep string) (string, map[string]string) {
		return "web:m", map[string]string{"RCLONE_CONFIG_WEB_TYPE": "http", "RCLONE_CONFIG_WEB_URL": ep}
	}
	azure := func(opt string) func(string) (string, map[string]string) {
		return func(ep string) (string, map[string]string) {
			return "az:c/m", map[string]string{"RCLONE_CONFIG_AZ_TYPE": "azureblob", "RCLONE_CONFIG_AZ_ACCOUNT": "acct", "RCLONE_CONFIG_AZ_" + opt: ep}
		}
	}
	gcsEndpoint := func(ep string) (string, map[string]string) {
		return "gcs1:b/m", map[string]string{"RCLONE_CONFIG_GCS1_TYPE": "gcs", "RCLONE_CONFIG_GCS1_ENDPOINT": ep}
	}
	gcsTokenURI := func(ep string) (string, map[string]string) {
		return "gs://b/m", map[string]string{"GOOGLE_APPLICATION_CREDENTIALS": `{"type":"service_account","private_key":"SUPERSECRETPRIVATEKEY9","token_uri":"` + ep + `"}`}
	}

	hostile := []struct {
		name  string
		form  func(string) (string, map[string]string)
		ep    string
		allow string // the allow-list entry that lets it through
		why   string
	}{
		{"loopback", s3Remote, "http://127.0.0.1:9000", "127.0.0.1", "127.0.0.1, which the rule loopback refuses"},
		{"loopback elsewhere in 127/8", awsForm, "http://127.3.4.5", "127.0.0.0/8", "127.3.4.5, which the rule loopback refuses"},
		{"localhost", s3Remote, "http://localhost:9000", "127.0.0.1,::1", "rule loopback"},
		{"localhost subdomain", awsForm, "http://minio.localhost.:9000", "127.0.0.1,::1", "rule loopback"},
		{"IPv6 loopback", s3Remote, "http://[::1]:9000", "::1", "is ::1, which the rule loopback refuses"},
		{"metadata IP", s3Remote, "http://169.254.169.254", "169.254.169.254", "is 169.254.169.254, which the rule link-local refuses: it reaches the node's cloud metadata service"},
		{"metadata name", awsForm, "http://metadata.google.internal", "169.254.0.0/16", "resolves to 169.254.169.254, which the rule link-local refuses"},
		{"IPv6 link-local", s3Remote, "http://[fe80::a9fe:a9fe]", "fe80::/10", "fe80::a9fe:a9fe, which the rule link-local refuses"},
		{"IPv6 link-local with zone", s3Remote, "http://[fe80::1%25eth0]:80", "fe80::1", "fe80::1, which the rule link-local refuses"},
		{"AWS IPv6 metadata", awsForm, "http://imds6.example", "fd00:ec2::254", "fd00:ec2::254, which the rule cloud-metadata refuses"},
		{"unspecified", s3Remote, "http://0.0.0.0:9000", "0.0.0.0", "0.0.0.0, which the rule unspecified refuses"},
		{"this network", awsForm, "http://zero.example", "0.0.0.0/8", "0.1.2.3, which the rule unspecified refuses"},
		{"IPv6 unspecified", s3Remote, "http://[::]:9000", "::", "::, which the rule unspecified refuses"},
		{"IPv4-mapped loopback", s3Remote, "http://[::ffff:127.0.0.1]", "127.0.0.1", "127.0.0.1, which the rule loopback refuses"},
		{"name resolving to mapped loopback", awsForm, "http://mapped.example", "127.0.0.1", "127.0.0.1, which the rule loopback refuses"},
		{"public and loopback", s3Remote, "http://mixed.example:9000", "127.0.0.1", "resolves to 127.0.0.1, which the rule loopback refuses"},
		{"node address", s3Remote, "http://" + nodeAddr + ":10250", nodeAddr, nodeAddr + ", which the rule node-address refuses"},
		{"name of the node", awsForm, "http://node.example", nodeAddr + "/32", "rule node-address"},
		{"broadcast", awsForm, "http://255.255.255.255", "255.255.255.255", "rule multicast"},
		{"multicast", awsForm, "http://224.0.0.1", "224.0.0.0/4", "rule multicast"},
		{"S3_ENDPOINT host", kserveForm, "169.254.169.254", "169.254.169.254", "link-local"},
		{"https modelUri", httpsForm, "169.254.169.254", "169.254.169.254", "link-local"},
		{"https modelUri name", httpsForm, "metadata.google.internal", "169.254.169.254", "link-local"},
		{"https modelUri localhost", httpsForm, "localhost:8443", "127.0.0.1,::1", "loopback"},
		{"http remote url", httpRemote, "https://127.0.0.1/", "127.0.0.1", "loopback"},
		{"azure endpoint", azure("ENDPOINT"), "http://127.0.0.1:10000/devstoreaccount1", "127.0.0.1", "loopback"},
		{"azure sas url", azure("SAS_URL"), "https://169.254.169.254/c?sig=SUPERSECRETSIG1", "169.254.169.254", "link-local"},
		{"gcs endpoint", gcsEndpoint, "http://[::1]:4443/storage/v1/", "::1", "loopback"},
		{"gcs token_uri", gcsTokenURI, "https://metadata.google.internal/token", "169.254.169.254", "link-local"},
	}
	for _, tc := range hostile {
		t.Run("refused/"+tc.name, func(t *testing.T) {
			uri, secrets := tc.form(tc.ep)
			r, _ := newTestRclone(t, hosts)
			remote, err := r.Resolve(context.Background(), uri, secrets)
			if !errors.Is(err, ErrInvalid) || remote != nil {
				t.Fatalf("Resolve(%q) with endpoint %q = %v, %v; want ErrInvalid", uri, tc.ep, remote, err)
			}
			for _, frag := range []string{tc.why, "--allow-endpoint", "endpoint "} {
				if !strings.Contains(err.Error(), frag) {
					t.Errorf("error %q does not say %q", err, frag)
				}
			}
			assertNoSecrets(t, "endpoint error", err.Error(), secrets)
			if strings.Contains(err.Error(), "sig=") {
				t.Errorf("error %q repeats the endpoint's query", err)
			}

			allow, err := egress.ParsePrefixes("--allow-endpoint", strings.Split(tc.allow, ","))
			if err != nil {
				t.Fatal(err)
			}
			r, _ = newTestRclone(t, hosts, WithAllowedEndpoints(allow))
			if _, err := r.Resolve(context.Background(), uri, secrets); err != nil {
				t.Errorf("Resolve(%q) with %s allowed: %v", uri, tc.allow, err)
			}
		})
	}

	accepted := []struct {
		name string
		form func(string) (string, map[string]string)
		ep   string
	}{
		{"public IP", s3Remote, "http://93.184.215.14:9000"},
		{"public IPv6", awsForm, "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]"},
		{"public name", s3Remote, "https://minio.example"},
		{"cluster service", kserveForm, "cluster.example:9000"},
		{"private address that is not the node's", s3Remote, "http://10.0.0.8:9000"},
		{"https modelUri", httpsForm, "minio.example:8443"},
		{"azure endpoint", azure("ENDPOINT"), "https://minio.example"},
		{"gcs token_uri", gcsTokenURI, "https://minio.example/token"},
	}
	for _, tc := range accepted {
		t.Run("accepted/"+tc.name, func(t *testing.T) {
			uri, secrets := tc.form(tc.ep)
			r, _ := newTestRclone(t, hosts)
			if _, err := r.Resolve(context.Background(), uri, secrets); err != nil {
				t.Errorf("Resolve(%q) with endpoint %q: %v", uri, tc.ep, err)
			}
		})
	}

	// The default AWS and Google endpoints are the clouds' own: no lookup.
	for _, tc := range []struct {
		uri     string
		secrets map[string]string
	}{
		{"s3://bucket/m", nil},
		{"s3://bucket/m", map[string]string{"AWS_REGION": "eu-west-1"}},
		{"gs://bucket/m", nil},
		{"mys3:bucket/m", map[string]string{"RCLONE_CONFIG_MYS3_TYPE": "s3", "RCLONE_CONFIG_MYS3_PROVIDER": "AWS"}},
		{"az:c/m", map[string]string{"RCLONE_CONFIG_AZ_TYPE": "azureblob", "RCLONE_CONFIG_AZ_ACCOUNT": "acct"}},
	} {
		r, dns := newTestRclone(t, nil)
		if _, err := r.Resolve(context.Background(), tc.uri, tc.secrets); err != nil {
			t.Errorf("Resolve(%q) without an endpoint: %v", tc.uri, err)
		}
		if n := dns.count(); n != 0 {
			t.Errorf("Resolve(%q) without an endpoint made %d DNS lookups, want none", tc.uri, n)
		}
	}
}

func TestResolveEndpointLookupFailures(t *testing.T) {
	tests := []struct {
		name string
		ep   string
		want error
		msg  string
	}{
		{"no such host", "http://missing.example:9000", ErrUnavailable, "no such host"},
		{"timeout", "http://timeout.example", ErrUnavailable, "timed out"},
		{"underscore-free garbage", "http://exa mple.com", ErrInvalid, "not an http(s) URL"},
		{"empty label", "http://a..b:9000", ErrInvalid, "not a valid host name"},
		{"label too long", "http://" + strings.Repeat("a", 64) + ".example", ErrInvalid, "not a valid host name"},
		{"decimal IPv4", "http://2130706433:9000", ErrInvalid, "non-standard form"},
		{"short IPv4", "http://127.1", ErrInvalid, "non-standard form"},
		{"hex IPv4", "http://0x7f.0.0.1", ErrInvalid, "non-standard form"},
		{"octal IPv4", "http://0177.0.0.1", ErrInvalid, "non-standard form"},
		{"trailing dot IPv4", "http://127.0.0.1.", ErrInvalid, "non-standard form"},
		{"bad port", "http://minio.example:99999", ErrInvalid, "invalid port"},
		{"IPv6 without brackets", "http://::1", ErrInvalid, "endpoint in RCLONE_CONFIG_MYS3_ENDPOINT"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r, dns := newTestRclone(t, nil)
			_, err := resolveAndList(r, context.Background(), tc.ep)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Resolve with endpoint %q = %v, want %v saying %q", tc.ep, err, tc.want, tc.msg)
			}
			if errors.Is(tc.want, ErrInvalid) && dns.count() != 0 {
				t.Errorf("a syntactically invalid endpoint was looked up in DNS")
			}
		})
	}

	t.Run("cancelled context", func(t *testing.T) {
		r, _ := newTestRclone(t, map[string][]string{"minio.example": {"93.184.215.14"}})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := resolveAndList(r, ctx, "http://minio.example")
		if !errors.Is(err, ErrUnavailable) {
			t.Errorf("Resolve with a cancelled context = %v, want ErrUnavailable", err)
		}
	})

	t.Run("node addresses unreadable", func(t *testing.T) {
		r, _ := newTestRclone(t, nil)
		r.interfaceAddrs = func() ([]net.Addr, error) { return nil, errors.New("netlink: permission denied") }
		_, err := resolveAndList(r, context.Background(), "http://93.184.215.14")
		if !errors.Is(err, ErrUnavailable) {
			t.Errorf("Resolve = %v, want ErrUnavailable (fail closed)", err)
		}
	})
}

// resolveAndList resolves a model behind endpoint and lists it. A failed
// lookup does not fail Resolve (a cache hit contacts no remote and must not
// fail because DNS is down); it fails the List, before any connection.
func resolveAndList(r *Sources, ctx context.Context, endpoint string) (Manifest, error) {
	remote, err := r.Resolve(ctx, "mys3:bucket/m", minioSecret(endpoint, secretKeyID, secretAccessKey))
	if err != nil {
		return nil, err
	}
	return remote.List(ctx)
}

// The guard reads the real interfaces by default: an address of this
// machine's is refused like the node's own.
func TestResolveRefusesRealInterfaceAddress(t *testing.T) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Skipf("cannot read interface addresses: %v", err)
	}
	var own netip.Addr
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		if ip, ok := netip.AddrFromSlice(n.IP); ok && !ip.Unmap().IsLoopback() && !ip.IsLinkLocalUnicast() {
			own = ip.Unmap()
			break
		}
	}
	if !own.IsValid() {
		t.Skip("this machine has no address other than loopback and link-local")
	}
	ep := "http://" + netip.AddrPortFrom(own, 9000).String()
	r := NewSources([]byte("node key"))
	_, err = r.Resolve(context.Background(), "mys3:bucket/m", minioSecret(ep, secretKeyID, secretAccessKey))
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), own.String()+", which the rule node-address refuses") {
		t.Errorf("Resolve with endpoint %s (this machine) = %v, want ErrInvalid naming the node's address", ep, err)
	}
	r = NewSources([]byte("node key"), WithAllowedEndpoints([]netip.Prefix{netip.PrefixFrom(own, own.BitLen())}))
	if _, err := r.Resolve(context.Background(), "mys3:bucket/m", minioSecret(ep, secretKeyID, secretAccessKey)); err != nil {
		t.Errorf("Resolve with endpoint %s allowed: %v", ep, err)
	}
}

// A listing redirected to a refused address (the controller's CreateVolume
// lists as a publish does) is refused at connect time: no connection
// reaches it, and the error names the host and the rule, not the client's
// SOCKS reply.
func TestListRedirectedToRefusedAddress(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatalf("listening on 127.0.0.2: %v", err)
	}
	var reached atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			reached.Add(1)
			c.Close()
		}
	}()
	defer ln.Close()
	redirect := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://"+ln.Addr().String()+r.URL.RequestURI(), http.StatusTemporaryRedirect)
	}))
	defer redirect.Close()

	r, _ := newTestRclone(t, nil, WithAllowedEndpoints([]netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}))
	remote, err := r.Resolve(context.Background(), "mys3:bucket/m", minioSecret(redirect.URL, secretKeyID, secretAccessKey))
	if err != nil {
		t.Fatalf("Resolve: %v (the endpoint itself is allowed)", err)
	}
	_, err = remote.List(context.Background())
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "127.0.0.2") || !strings.Contains(err.Error(), "rule loopback") {
		t.Fatalf("List through a redirect to 127.0.0.2 = %v, want ErrRefused naming the address and the rule", err)
	}
	assertNoSecrets(t, "refusal", err.Error(), minioSecret(redirect.URL, secretKeyID, secretAccessKey))
	if n := reached.Load(); n != 0 {
		t.Errorf("%d connections reached the refused address", n)
	}
}
