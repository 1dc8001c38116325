package holders

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
)

// Members are the node plugins serving peers: the ready endpoints of the
// EndpointSlices of a headless Service over the DaemonSet, named by node.
// Kubernetes keeps the slices (a pod that is not ready or is gone leaves
// them), so membership costs the node plugin a watch and no write.
type Members struct {
	lister  discoverylisters.EndpointSliceLister
	sel     labels.Selector
	port    string
	stop    chan struct{}
	factory informers.SharedInformerFactory
}

// WatchMembers starts watching the EndpointSlices of service in namespace
// and returns once they are listed; port names the peer port in them.
func WatchMembers(ctx context.Context, kube kubernetes.Interface, namespace, service, port string) (*Members, error) {
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: service})
	factory := informers.NewSharedInformerFactoryWithOptions(kube, 10*time.Minute, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sel.String() }))
	inf := factory.Discovery().V1().EndpointSlices()
	m := &Members{lister: inf.Lister(), sel: sel, port: port, stop: make(chan struct{}), factory: factory}
	informer := inf.Informer()
	factory.Start(m.stop)
	if !cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		m.Stop()
		return nil, fmt.Errorf("listing the endpoints of service %s/%s: %w", namespace, service, ctx.Err())
	}
	return m, nil
}

// Stop ends the watch.
func (m *Members) Stop() {
	close(m.stop)
	m.factory.Shutdown()
}

// Addr is the host:port of the node plugin on node, if it is ready.
func (m *Members) Addr(node string) (string, bool) {
	slices, err := m.lister.List(m.sel)
	if err != nil {
		return "", false
	}
	for _, s := range slices {
		port, ok := m.portOf(s)
		if !ok {
			continue
		}
		for _, e := range s.Endpoints {
			if ptr.Deref(e.NodeName, "") != node || !ptr.Deref(e.Conditions.Ready, false) || len(e.Addresses) == 0 {
				continue
			}
			return net.JoinHostPort(e.Addresses[0], strconv.Itoa(int(port))), true
		}
	}
	return "", false
}

func (m *Members) portOf(s *discoveryv1.EndpointSlice) (int32, bool) {
	for _, p := range s.Ports {
		if ptr.Deref(p.Name, "") == m.port && p.Port != nil {
			return *p.Port, true
		}
	}
	return 0, false
}
