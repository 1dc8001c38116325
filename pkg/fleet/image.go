package fleet

import (
	"context"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// ControllerContainer is the name of the driver's container in the
// controller Deployment (deploy/kubernetes/controller.yaml).
const ControllerContainer = "modelcache"

// OwnImage is the image of container in the pod namespace/name: the
// controller's own, so that holders run exactly the image the cluster
// already pulled for the driver, whatever kustomize or Helm set it to.
func OwnImage(ctx context.Context, client kubernetes.Interface, namespace, name, container string) (string, error) {
	pod, err := client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("reading the controller's own pod %s/%s for its image: %w", namespace, name, err)
	}
	for _, c := range pod.Spec.Containers {
		if c.Name == container {
			return c.Image, nil
		}
	}
	return "", fmt.Errorf("the controller's pod %s/%s has no container %q to take the holder image from; pass --holder-image", namespace, name, container)
}
