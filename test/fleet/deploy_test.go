package fleet_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"testing"

	"github.com/modelcache/modelcache/test/testenv"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/restmapper"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"
)

// TestDeploy_RenderedObjectsValidateOnTheAPIServer applies (server-side,
// dry run) every object the kustomize base, the make e2e overlay, the base
// with peers off and the Helm chart with its egress, CachedModel policy
// and peers values set render: the API server's own validation accepts
// each of them, CEL of the admission policy and NetworkPolicy included.
func TestDeploy_RenderedObjectsValidateOnTheAPIServer(t *testing.T) {
	ensureCRD(t)
	ensureRBAC(t) // the modelcache namespace
	dc, err := discovery.NewDiscoveryClientForConfig(env.admin)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	renders := map[string][]string{
		"kustomize base": {"kustomize", "build", "deploy/kubernetes"},
		"e2e overlay":    {"kustomize", "build", "test/e2e/overlay/kustomize"},
		"helm with values": {"helm", "template", "modelcache", "deploy/helm/modelcache", "--namespace", controllerNamespace, "--include-crds",
			"--set", "egress.denyCIDRs={10.96.0.0/12,fd00:10::/64}", "--set", "cachedModelPolicy.priorityClasses={model-warm}",
			"--set", "egress.networkPolicy.extraEgress[0].ports[0].port=53,egress.networkPolicy.extraEgress[0].to[0].ipBlock.cidr=169.254.20.10/32",
			"--set", "peers.port=9555,peers.maxStreams=8,metrics.enabled=false"},
		"kustomize without peers": {"kustomize", "build", "test/manifests/testdata/no-peers"},
		"helm without peers": {"helm", "template", "modelcache", "deploy/helm/modelcache", "--namespace", controllerNamespace, "--include-crds",
			"--set", "peers.enabled=false"},
	}
	ctx := context.Background()
	for name, args := range renders {
		t.Run(name, func(t *testing.T) {
			out, err := testenv.RunTool(args[0], args[1:]...)
			if err != nil {
				t.Fatal(err)
			}
			for _, doc := range splitYAML(t, out) {
				var obj map[string]any
				if err := yaml.Unmarshal(doc, &obj); err != nil {
					t.Fatal(err)
				}
				u := &unstructured.Unstructured{Object: obj}
				m, err := mapper.RESTMapping(u.GroupVersionKind().GroupKind(), u.GroupVersionKind().Version)
				if err != nil {
					t.Errorf("%s %s: %v", u.GetKind(), u.GetName(), err)
					continue
				}
				data, err := u.MarshalJSON()
				if err != nil {
					t.Fatal(err)
				}
				ri := env.dyn.Resource(m.Resource).Namespace(u.GetNamespace())
				if _, err := ri.Patch(ctx, u.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{
					FieldManager: "fleet-test", Force: ptr.To(true), DryRun: []string{metav1.DryRunAll},
				}); err != nil {
					t.Errorf("%s %s/%s refused: %v", u.GetKind(), u.GetNamespace(), u.GetName(), err)
				}
			}
		})
	}
}

// splitYAML splits a multi-document YAML stream into its non-empty documents.
func splitYAML(t *testing.T, raw []byte) [][]byte {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(bytes.TrimSpace(doc)) > 0 {
			docs = append(docs, doc)
		}
	}
}
