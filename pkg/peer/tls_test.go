package peer_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/pkg/peer/peertest"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// TestLoadOrCreateCA_RaceAgrees: two nodes that both find no CA both make
// one; the API server keeps the first, and the second reads it back.
func TestLoadOrCreateCA_RaceAgrees(t *testing.T) {
	kube := fake.NewClientset()
	// Both nodes' first reads find nothing, whoever creates first: a
	// node's second read comes only after its create failed, which is
	// after the other's create, which is after the other's first read.
	// (The fake runs reactors one at a time: no barrier in them.)
	var mu sync.Mutex
	misses := 0
	kube.PrependReactor("get", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		if misses == 2 {
			return false, nil, nil
		}
		misses++
		return true, nil, apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, "peer-ca")
	})
	cas := make([]*peer.CA, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() { cas[i], errs[i] = peer.LoadOrCreateCA(context.Background(), kube, "modelcache", "peer-ca") })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
	}
	if !bytes.Equal(cas[0].Cert.Raw, cas[1].Cert.Raw) {
		t.Fatal("the two nodes hold different CAs")
	}
	creates := 0
	for _, a := range kube.Actions() {
		if a.GetVerb() == "create" {
			creates++
		}
	}
	if creates != 2 {
		t.Errorf("%d creates, want 2 (one AlreadyExists): the race was not run", creates)
	}
	s, err := kube.CoreV1().Secrets("modelcache").Get(context.Background(), "peer-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Type != corev1.SecretTypeTLS || len(s.Data[corev1.TLSPrivateKeyKey]) == 0 {
		t.Errorf("the Secret is %s with keys %v, want kubernetes.io/tls", s.Type, len(s.Data))
	}
	again, err := peer.LoadOrCreateCA(context.Background(), kube, "modelcache", "peer-ca")
	if err != nil || !bytes.Equal(again.Cert.Raw, cas[0].Cert.Raw) {
		t.Errorf("a later start: %v, same CA %v", err, err == nil && bytes.Equal(again.Cert.Raw, cas[0].Cert.Raw))
	}
}

// TestLoadOrCreateCA_Refusals: a Secret that holds no CA, or an API server
// that fails, is an error naming the Secret, never its data.
func TestLoadOrCreateCA_Refusals(t *testing.T) {
	ca, err := peer.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	garbageKey := []byte("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n")
	tests := []struct {
		name   string
		secret *corev1.Secret
		react  func(k8stesting.Action) (bool, runtime.Object, error)
	}{
		{name: "empty Secret", secret: &corev1.Secret{}},
		{name: "garbage key", secret: &corev1.Secret{Data: map[string][]byte{corev1.TLSCertKey: certPEM(ca), corev1.TLSPrivateKeyKey: garbageKey}}},
		{name: "API server fails", react: func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "secrets"}, "peer-ca", errors.New("RBAC"))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kube := fake.NewClientset()
			if tt.secret != nil {
				tt.secret.Name, tt.secret.Namespace = "peer-ca", "modelcache"
				if _, err := kube.CoreV1().Secrets("modelcache").Create(context.Background(), tt.secret, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			if tt.react != nil {
				kube.PrependReactor("*", "secrets", tt.react)
			}
			_, err := peer.LoadOrCreateCA(context.Background(), kube, "modelcache", "peer-ca")
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), "modelcache/peer-ca") {
				t.Errorf("error %q does not name the Secret", err)
			}
			if strings.Contains(err.Error(), "c2VjcmV0") || strings.Contains(err.Error(), "PRIVATE") {
				t.Errorf("error %q shows the Secret's data", err)
			}
		})
	}
}

func certPEM(ca *peer.CA) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// TestTLS_TrustOnlyTheCA: a client of ClientConfig reaches a server of
// ServingConfig signed by the same CA for the address it dials, over TLS
// 1.3; any other CA, another address, or an older TLS is refused.
func TestTLS_TrustOnlyTheCA(t *testing.T) {
	p := startPeer(t, peer.Config{})
	sum := p.blobs.put(t, []byte("bytes"))
	other, err := peer.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	// A server whose certificate is for another pod IP than the one dialled.
	elsewhere, err := peer.ServingConfig(p.ca, "node-b", "10.0.0.7")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := peer.NewServer(peer.Config{Blobs: p.blobs, Objects: p.objects, Reviewer: p.rev, Namespace: pluginNS, ServiceAccount: pluginSA})
	if err != nil {
		t.Fatal(err)
	}
	wrongIP := peertest.ServeTLS(t, srv, elsewhere)

	mine, _ := peer.ClientConfig(p.ca)
	theirs, _ := peer.ClientConfig(other)
	tls12 := mine.Clone()
	tls12.MinVersion, tls12.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	tests := []struct {
		name string
		conf *tls.Config
		addr string
		ok   bool
	}{
		{name: "same CA", conf: mine, addr: p.addr, ok: true},
		{name: "another CA", conf: theirs, addr: p.addr},
		{name: "certificate for another IP", conf: mine, addr: wrongIP},
		{name: "TLS 1.2", conf: tls12, addr: p.addr},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &peer.Client{TLS: tt.conf, Tokens: staticToken(pluginToken)}
			rc, err := c.OpenRange(context.Background(), tt.addr, sum, 0, 5)
			if err == nil {
				rc.Close()
			}
			if (err == nil) != tt.ok {
				t.Errorf("error %v, want success %v", err, tt.ok)
			}
		})
	}
	if got := p.do(t, http.MethodGet, peer.BlobsPath+sum, pluginToken, nil); got.status != 200 {
		t.Errorf("status %d", got.status)
	}
}
