package peer

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// CA is the peers' certificate authority: every node plugin signs its own
// serving certificate with it and trusts no other.
type CA struct {
	Cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

const (
	caLifetime      = 10 * 365 * 24 * time.Hour
	servingLifetime = 30 * 24 * time.Hour
	// clockSkew backdates certificates for nodes whose clocks lag.
	clockSkew = time.Hour
)

// NewCA makes a CA (ECDSA P-256) in memory.
func NewCA() (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the peer CA's key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "modelcache-peer-ca"},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(caLifetime),
		IsCA:                  true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("signing the peer CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("reading the peer CA back: %w", err)
	}
	return &CA{Cert: cert, key: key}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// LoadOrCreateCA reads the peers' CA from a kubernetes.io/tls Secret, or
// creates the Secret with a new CA when there is none. Nodes that start at
// once may all create one: the API server keeps the first, the others get
// AlreadyExists and read that one, so every node ends with the same CA.
// The account needs get and create on that Secret.
func LoadOrCreateCA(ctx context.Context, kube kubernetes.Interface, namespace, secretName string) (*CA, error) {
	secrets := kube.CoreV1().Secrets(namespace)
	s, err := secrets.Get(ctx, secretName, metav1.GetOptions{})
	if err == nil {
		return caFromSecret(s)
	}
	if !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("reading the peer CA from Secret %s/%s: %w", namespace, secretName, err)
	}
	ca, err := NewCA()
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(ca.key)
	if err != nil {
		return nil, fmt.Errorf("encoding the peer CA's key: %w", err)
	}
	s = &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: secretName, Namespace: namespace,
			Labels: map[string]string{"app.kubernetes.io/component": "peer-ca"}},
		Type: corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw}),
			corev1.TLSPrivateKeyKey: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		},
	}
	created, err := secrets.Create(ctx, s, metav1.CreateOptions{})
	if err == nil {
		return caFromSecret(created)
	}
	if !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("creating the peer CA in Secret %s/%s: %w", namespace, secretName, err)
	}
	s, err = secrets.Get(ctx, secretName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading the peer CA another node created in Secret %s/%s: %w", namespace, secretName, err)
	}
	return caFromSecret(s)
}

// caFromSecret parses a CA Secret; its errors name the Secret, never its
// data.
func caFromSecret(s *corev1.Secret) (*CA, error) {
	bad := func(why string) error {
		return fmt.Errorf("the Secret %s/%s does not hold a peer CA (%s): delete it and the node plugins make a new one", s.Namespace, s.Name, why)
	}
	pair, err := tls.X509KeyPair(s.Data[corev1.TLSCertKey], s.Data[corev1.TLSPrivateKeyKey])
	if err != nil {
		return nil, bad("no certificate and matching key")
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, bad("the key is not ECDSA")
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil || !cert.IsCA {
		return nil, bad("the certificate is no CA")
	}
	if time.Now().After(cert.NotAfter) {
		return nil, bad("the certificate expired")
	}
	return &CA{Cert: cert, key: key}, nil
}

// issue signs a serving certificate for a node's pod IP (and its name).
func (ca *CA) issue(nodeName string, ip net.IP) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating a peer serving key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: nodeName},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     now.Add(servingLifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{ip},
	}
	if nodeName != "" {
		tmpl.DNSNames = []string{nodeName}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("signing a peer serving certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("reading a peer serving certificate back: %w", err)
	}
	return &tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// ServingConfig is the TLS config of a node's peer endpoint: a key made in
// memory and a certificate for podIP signed by ca, issued again before it
// expires (the plugin may run longer than a certificate lives). TLS 1.3
// and HTTP/1.1 only: every range is its own TCP connection, which HTTP/2's
// per-connection flow control would make share one.
func ServingConfig(ca *CA, nodeName, podIP string) (*tls.Config, error) {
	ip := net.ParseIP(podIP)
	if ip == nil {
		return nil, fmt.Errorf("pod IP %q is not an IP address", podIP)
	}
	sc := &servingCert{ca: ca, node: nodeName, ip: ip}
	if _, err := sc.get(nil); err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		NextProtos:     []string{"http/1.1"},
		GetCertificate: sc.get,
	}, nil
}

// servingCert is a node's serving certificate, renewed when a third of its
// life is left.
type servingCert struct {
	ca   *CA
	node string
	ip   net.IP

	mu   sync.Mutex
	cert *tls.Certificate
}

func (s *servingCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cert != nil && time.Until(s.cert.Leaf.NotAfter) > servingLifetime/3 {
		return s.cert, nil
	}
	c, err := s.ca.issue(s.node, s.ip)
	if err != nil {
		if s.cert != nil {
			return s.cert, nil // still valid; the next handshake tries again
		}
		return nil, err
	}
	s.cert = c
	return c, nil
}

// ClientConfig is the TLS config of a node asking peers: it trusts the
// peers' CA and nothing else (not the system's roots), TLS 1.3 only.
func ClientConfig(ca *CA) (*tls.Config, error) {
	if ca == nil || ca.Cert == nil {
		return nil, errors.New("peer client: no CA")
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"http/1.1"},
		RootCAs:    pool,
	}, nil
}
