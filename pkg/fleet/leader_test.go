package fleet

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Two controller replicas: one holds the lease and reconciles; when it
// stops, the other takes over and reconciles what changed meanwhile.
func TestRunElected_OneReplicaReconcilesAtATime(t *testing.T) {
	c := newClients(t, []*CachedModel{cachedModel("first")})
	a := &Reconciler{Kube: c.kube, Dynamic: c.dyn, Image: image}
	b := &Reconciler{Kube: c.kube, Dynamic: c.dyn, Image: image}
	ctxA, stopA := context.WithCancel(context.Background())
	ctxB, stopB := context.WithCancel(context.Background())
	defer stopB()
	doneA, doneB := make(chan error, 1), make(chan error, 1)
	go func() { doneA <- a.RunElected(ctxA, "modelcache", "replica-a", 1) }()
	waitUntil(t, "replica-a leads", func() bool { return leader(c) == "replica-a" })
	go func() { doneB <- b.RunElected(ctxB, "modelcache", "replica-b", 1) }()
	waitUntil(t, "the first CachedModel's holders", func() bool { return c.hasDaemonSet("cachedmodel-first") })
	if l := leader(c); l != "replica-a" {
		t.Fatalf("lease holder %q after a second replica started, want replica-a", l)
	}

	stopA()
	if err := <-doneA; err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "replica-b leads after replica-a stopped", func() bool { return leader(c) == "replica-b" })
	if err := c.createCachedModel(cachedModel("second")); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the second CachedModel's holders, by replica-b", func() bool { return c.hasDaemonSet("cachedmodel-second") })
	stopB()
	if err := <-doneB; err != nil {
		t.Fatal(err)
	}
}

func leader(c *clients) string {
	l, err := c.kube.CoordinationV1().Leases("modelcache").Get(context.Background(), LeaseName, metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

func (c *clients) hasDaemonSet(name string) bool {
	_, err := c.kube.AppsV1().DaemonSets(ns).Get(context.Background(), name, metav1.GetOptions{})
	return err == nil
}

func waitUntil(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
