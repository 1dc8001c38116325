package fleet

import (
	"context"
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
)

// resync re-lists CachedModels now and then, so a missed watch event
// delays a reconcile, never loses it.
const resync = 10 * time.Minute

// Run reconciles every CachedModel until ctx ends: on each change of a
// CachedModel or of a holder DaemonSet, and again after the interval each
// reconcile asks for. workers reconcile different CachedModels at once.
func (r *Reconciler) Run(ctx context.Context, workers int) error {
	queue := workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "cachedmodels"})
	defer queue.ShutDown()

	dyn := dynamicinformer.NewDynamicSharedInformerFactory(r.Dynamic, resync)
	models := dyn.ForResource(Resource).Informer()
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			queue.Add(key)
		}
	}
	if _, err := models.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, obj any) { enqueue(obj) }, DeleteFunc: enqueue,
	}); err != nil {
		return fmt.Errorf("watching CachedModels: %w", err)
	}
	kube := informers.NewSharedInformerFactoryWithOptions(r.Kube, resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = LabelManagedBy + "=" + managedBy }))
	holders := kube.Apps().V1().DaemonSets().Informer()
	enqueueOwner := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		ds, ok := obj.(*appsv1.DaemonSet)
		if !ok {
			return
		}
		if o := metav1.GetControllerOf(ds); o != nil && o.Kind == Kind {
			queue.Add(ds.Namespace + "/" + o.Name)
		}
	}
	if _, err := holders.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueueOwner, UpdateFunc: func(_, obj any) { enqueueOwner(obj) }, DeleteFunc: enqueueOwner,
	}); err != nil {
		return fmt.Errorf("watching holder DaemonSets: %w", err)
	}
	dyn.Start(ctx.Done())
	kube.Start(ctx.Done())
	defer dyn.Shutdown()
	defer kube.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), models.HasSynced, holders.HasSynced) {
		return fmt.Errorf("CachedModel and DaemonSet caches did not sync: %w", ctx.Err())
	}
	klog.InfoS("CachedModel reconciler started", "workers", workers, "holderImage", r.Image)
	for range workers {
		go func() {
			for r.next(ctx, queue) {
			}
		}()
	}
	<-ctx.Done()
	return nil
}

// next reconciles one queued CachedModel; false once the queue shuts down.
func (r *Reconciler) next(ctx context.Context, queue workqueue.TypedRateLimitingInterface[string]) bool {
	key, quit := queue.Get()
	if quit {
		return false
	}
	defer queue.Done(key)
	namespace, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		queue.Forget(key)
		return true
	}
	after, err := r.Reconcile(ctx, namespace, name)
	if err != nil {
		utilruntime.HandleErrorWithContext(ctx, err, "reconciling CachedModel", "cachedModel", key)
		queue.AddRateLimited(key)
		return true
	}
	queue.Forget(key)
	if after > 0 {
		queue.AddAfter(key, after)
	}
	return true
}
