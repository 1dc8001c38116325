package fleet

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

// LeaseName is the Lease the controller replicas elect the one reconciler
// with, in the controller's namespace.
const LeaseName = "modelcache-cachedmodels"

// RunElected runs the reconciler only while this replica (identity, in
// namespace) holds the Lease, so that a controller Deployment of several
// replicas has one writer of holder DaemonSets and statuses. It returns
// when ctx ends.
func (r *Reconciler) RunElected(ctx context.Context, namespace, identity string, workers int) error {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: namespace, Name: LeaseName},
		Client:     r.Kube.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: identity},
	}
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   15 * time.Second,
		RenewDeadline:   10 * time.Second,
		RetryPeriod:     2 * time.Second,
		ReleaseOnCancel: true,
		Name:            LeaseName,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(ctx context.Context) {
				if err := r.Run(ctx, workers); err != nil {
					klog.ErrorS(err, "CachedModel reconciler stopped")
				}
			},
			OnStoppedLeading: func() {
				klog.InfoS("no longer reconciling CachedModels: the lease went to another replica or the controller is stopping")
			},
			OnNewLeader: func(id string) {
				if id != identity {
					klog.InfoS("CachedModels are reconciled by another replica", "leader", id)
				}
			},
		},
	})
	if err != nil {
		return fmt.Errorf("electing the CachedModel reconciler: %w", err)
	}
	// A replica that lost the lease campaigns again until ctx ends.
	for ctx.Err() == nil {
		le.Run(ctx)
	}
	return nil
}
