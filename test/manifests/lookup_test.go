package manifests

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// Lookups over decoded documents. Names are specific on purpose: the
// package also holds helm_test.go.

// docsUnder returns the documents of the files under dir (a path relative
// to the repository root, e.g. "deploy/kubernetes").
func docsUnder(docs []document, dir string) []document {
	var out []document
	prefix := filepath.Clean(dir) + string(filepath.Separator)
	for _, d := range docs {
		if strings.HasPrefix(d.file, prefix) {
			out = append(out, d)
		}
	}
	return out
}

// objectsOf returns the objects of type T among docs.
func objectsOf[T runtime.Object](docs []document) []T {
	var out []T
	for _, d := range docs {
		if o, ok := d.obj.(T); ok {
			out = append(out, o)
		}
	}
	return out
}

// theObject returns the one object of type T named name among docs.
func theObject[T runtime.Object](t *testing.T, docs []document, name string) T {
	t.Helper()
	var found []T
	for _, o := range objectsOf[T](docs) {
		if m, err := meta.Accessor(o); err == nil && m.GetName() == name {
			found = append(found, o)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("found %d %T named %q, want exactly one", len(found), zero, name)
	}
	return found[0]
}

// containerWithImage returns the one container (init or not) whose image
// contains image.
func containerWithImage(t *testing.T, spec *corev1.PodSpec, image string) *corev1.Container {
	t.Helper()
	var found []*corev1.Container
	for _, c := range allContainers(spec) {
		if strings.Contains(c.Image, image) {
			found = append(found, c)
		}
	}
	if len(found) != 1 {
		t.Fatalf("found %d containers with image %q, want exactly one", len(found), image)
	}
	return found[0]
}

// allContainers returns the init containers and the containers of spec.
func allContainers(spec *corev1.PodSpec) []*corev1.Container {
	var out []*corev1.Container
	for i := range spec.InitContainers {
		out = append(out, &spec.InitContainers[i])
	}
	for i := range spec.Containers {
		out = append(out, &spec.Containers[i])
	}
	return out
}

// argValues returns the values a command line gives flag (with its dashes,
// e.g. "--endpoint"), in the forms Go's flag package accepts: "--f=v",
// "-f=v", and "--f v" / "-f v" for a flag that is not the last argument.
// Boolean flags given bare have the value "true".
func argValues(args []string, flag string) []string {
	name := strings.TrimLeft(flag, "-")
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		if !strings.HasPrefix(a, "-") {
			continue
		}
		n, v, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if n != name {
			continue
		}
		switch {
		case hasValue:
			out = append(out, v)
		case i+1 < len(args) && !strings.HasPrefix(args[i+1], "-"):
			out = append(out, args[i+1])
			i++
		default:
			out = append(out, "true")
		}
	}
	return out
}

// theArg returns the single value of flag in c's args, or fails.
func theArg(t *testing.T, c *corev1.Container, flag string) string {
	t.Helper()
	v := argValues(c.Args, flag)
	if len(v) != 1 {
		t.Fatalf("container %s: %s is given %d times (%q), want once", c.Name, flag, len(v), v)
	}
	return v[0]
}

// volumeNamed returns the pod's volume called name, or fails.
func volumeNamed(t *testing.T, spec *corev1.PodSpec, name string) *corev1.Volume {
	t.Helper()
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == name {
			return &spec.Volumes[i]
		}
	}
	t.Fatalf("the pod has no volume %q", name)
	return nil
}

// mountAt returns c's volume mount at mountPath, or nil.
func mountAt(c *corev1.Container, mountPath string) *corev1.VolumeMount {
	for i := range c.VolumeMounts {
		if filepath.Clean(c.VolumeMounts[i].MountPath) == filepath.Clean(mountPath) {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

// hostPathOf returns the host path behind c's mount at mountPath, or fails
// when nothing is mounted there or the volume is not a hostPath.
func hostPathOf(t *testing.T, spec *corev1.PodSpec, c *corev1.Container, mountPath string) string {
	t.Helper()
	m := mountAt(c, mountPath)
	if m == nil {
		t.Fatalf("container %s mounts nothing at %s", c.Name, mountPath)
	}
	v := volumeNamed(t, spec, m.Name)
	if v.HostPath == nil {
		t.Fatalf("container %s: volume %s at %s is not a hostPath", c.Name, v.Name, mountPath)
	}
	return v.HostPath.Path
}

// podSpecOf is a workload's pod spec, with the namespace its pods run in.
type podSpecOf struct {
	what      string // kind/name, for messages
	namespace string
	spec      *corev1.PodSpec
}

// podSpecs returns the pod specs of every workload among docs, including
// the pod specs inside SeldonDeployments and InferenceServices. An
// InferenceService's model container is appended to its pod spec's
// containers, as KServe does when it merges it into the serving runtime.
func podSpecs(docs []document) []podSpecOf {
	ns := func(n string) string {
		if n == "" {
			return "default"
		}
		return n
	}
	var out []podSpecOf
	for _, d := range docs {
		switch o := d.obj.(type) {
		case *corev1.Pod:
			out = append(out, podSpecOf{"Pod/" + o.Name, ns(o.Namespace), &o.Spec})
		case *appsv1.Deployment:
			out = append(out, podSpecOf{"Deployment/" + o.Name, ns(o.Namespace), &o.Spec.Template.Spec})
		case *appsv1.DaemonSet:
			out = append(out, podSpecOf{"DaemonSet/" + o.Name, ns(o.Namespace), &o.Spec.Template.Spec})
		case *appsv1.StatefulSet:
			out = append(out, podSpecOf{"StatefulSet/" + o.Name, ns(o.Namespace), &o.Spec.Template.Spec})
		case *batchv1.Job:
			out = append(out, podSpecOf{"Job/" + o.Name, ns(o.Namespace), &o.Spec.Template.Spec})
		case *SeldonDeployment:
			for _, p := range o.Spec.Predictors {
				for i := range p.ComponentSpecs {
					out = append(out, podSpecOf{"SeldonDeployment/" + o.Name + "/" + p.Name, ns(o.Namespace), &p.ComponentSpecs[i].Spec})
				}
			}
		case *InferenceService:
			spec := o.Spec.Predictor.PodSpec.DeepCopy()
			if m := o.Spec.Predictor.Model; m != nil {
				c := m.Container.DeepCopy()
				if c.Name == "" {
					c.Name = "kserve-container"
				}
				spec.Containers = append(spec.Containers, *c)
			}
			out = append(out, podSpecOf{"InferenceService/" + o.Name, ns(o.Namespace), spec})
		}
	}
	return out
}

// yamlDocuments splits a multi-document YAML stream, leaving out documents
// that hold only comments.
func yamlDocuments(t *testing.T, what string, raw []byte) [][]byte {
	t.Helper()
	var docs [][]byte
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) > 0 {
			docs = append(docs, doc)
		}
	}
}
