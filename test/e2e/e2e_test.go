package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/e2e/cluster"
	"github.com/modelcache/modelcache/test/testenv"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	modelsNS = "models"
	bucket   = "models"
	// The secret Seldon users already have for their storage initializer.
	seldonSecret = "seldon-rclone-secret"
)

// remote is a MinIO bucket seen through a proxy that counts (and can
// throttle) what the node plugin fetches.
type remote struct {
	proxy *testenv.Proxy
}

func newRemote(t *testing.T) *remote {
	t.Helper()
	p, err := testenv.StartProxy(suite.minio.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return &remote{proxy: p}
}

// secret creates a Seldon-style rclone secret for remote mys3 through r.
func (r *remote) secret(t *testing.T, name string, mutate func(map[string]string)) {
	t.Helper()
	data := testenv.RcloneSecret("mys3", r.proxy.URL)
	if mutate != nil {
		mutate(data)
	}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: modelsNS}, StringData: data}
	if _, err := suite.cluster.Client.CoreV1().Secrets(modelsNS).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating secret %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = suite.cluster.Client.CoreV1().Secrets(modelsNS).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

// model uploads files under prefix and returns its modelUri and the
// sha256 of each file.
func model(t *testing.T, prefix string, seed byte, sizes map[string]int) (string, map[string]string) {
	t.Helper()
	files, sums := randomFiles(seed, sizes)
	if err := testenv.PutModel(context.Background(), testenv.Client(suite.minio.Endpoint), bucket, prefix, files); err != nil {
		t.Fatal(err)
	}
	return "mys3:" + bucket + "/" + prefix, sums
}

// checkScript is the model server stand-in: it prints the sha256 of every
// file under /mnt/models, tries to change the model in three ways, and
// then waits to be deleted.
const checkScript = `cd /mnt/models || exit 1
find . -type f | sort | while read f; do sha256sum "$f"; done
if echo changed >> config.json 2>/dev/null; then echo WRITE=ok; else echo WRITE=refused; fi
if touch new-file 2>/dev/null; then echo CREATE=ok; else echo CREATE=refused; fi
if rm -f config.json 2>/dev/null && [ ! -e config.json ]; then echo REMOVE=ok; else echo REMOVE=refused; fi
echo CHECKS-DONE
trap 'exit 0' TERM
while true; do sleep 1; done
`

// inlineVolume is the CSI inline volume of a SeldonDeployment's
// componentSpecs, as in deploy/examples/seldon.
func inlineVolume(uri, secret string, readOnly *bool) corev1.Volume {
	return corev1.Volume{Name: "models", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
		Driver:               "modelcache.csi.dev",
		ReadOnly:             readOnly,
		VolumeAttributes:     map[string]string{"modelUri": uri},
		NodePublishSecretRef: &corev1.LocalObjectReference{Name: secret},
	}}}
}

// modelPod creates a model-server pod with vol mounted at /mnt/models.
func modelPod(t *testing.T, name string, vol corev1.Volume, mountReadOnly bool) *corev1.Pod {
	t.Helper()
	return modelPodWith(t, name, vol, func(p *corev1.Pod) { p.Spec.Containers[0].VolumeMounts[0].ReadOnly = mountReadOnly })
}

// modelPodWith creates a model-server pod with vol mounted read-only at
// /mnt/models, changed by mutate.
func modelPodWith(t *testing.T, name string, vol corev1.Volume, mutate func(*corev1.Pod)) *corev1.Pod {
	t.Helper()
	grace := int64(2)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: modelsNS, Labels: map[string]string{"app": "model-server"}},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name: "model-server", Image: testImage, ImagePullPolicy: corev1.PullNever,
				Command:      []string{"/bin/sh", "-c", checkScript},
				VolumeMounts: []corev1.VolumeMount{{Name: vol.Name, MountPath: "/mnt/models", ReadOnly: true}},
			}},
			Volumes: []corev1.Volume{vol},
		},
	}
	mutate(pod)
	created, err := suite.cluster.Client.CoreV1().Pods(modelsNS).Create(context.Background(), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s: %v", name, err)
	}
	return created
}

// checkedPod waits until the pod is Ready and its checks ran, and returns
// the pod and what it printed.
func checkedPod(t *testing.T, pod *corev1.Pod, limit time.Duration) (*corev1.Pod, string) {
	t.Helper()
	pod = waitPodReady(t, pod, limit)
	var out string
	waitFor(t, "checks of pod "+pod.Name, time.Minute, func() error {
		out = podLog(pod, "model-server")
		if strings.Contains(out, "CHECKS-DONE") {
			return nil
		}
		return fmt.Errorf("log so far: %q", out)
	})
	return pod, out
}

// wantModel checks the pod saw exactly the model's files, byte for byte,
// and could change none of them.
func wantModel(t *testing.T, pod *corev1.Pod, out string, sums map[string]string) {
	t.Helper()
	var want []string
	for name, sum := range sums {
		want = append(want, sum+"  ./"+name)
	}
	sort.Strings(want)
	var got []string
	for _, line := range strings.Split(out, "\n") {
		if len(line) > 66 && line[64] == ' ' {
			got = append(got, line)
		}
	}
	sort.Strings(got)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("pod %s saw\n%s\nwant\n%s", pod.Name, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for _, change := range []string{"WRITE", "CREATE", "REMOVE"} {
		if !strings.Contains(out, change+"=refused") {
			t.Errorf("pod %s: %s in /mnt/models was not refused:\n%s", pod.Name, change, out)
		}
	}
}

// wantReadOnlyOnHost checks the host's mount namespace, where kubelet and
// the runtime see the target: mounted ro,nosuid,nodev, and a write as root
// fails with EROFS.
func wantReadOnlyOnHost(t *testing.T, target string) {
	t.Helper()
	opts := hostMountOptions(target)
	if opts == "" {
		t.Fatalf("%s is not a mount point in the host's mount namespace", target)
	}
	for _, o := range []string{"ro", "nosuid", "nodev"} {
		if !contains(strings.Split(opts, ","), o) {
			t.Errorf("on the host %s is mounted %q, want %s", target, opts, o)
		}
	}
	err := os.WriteFile(filepath.Join(target, "config.json"), []byte("changed on the host"), 0o644)
	if !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing config.json through the host's view of %s: got %v, want EROFS", target, err)
	}
}

// hostMountOptions returns the per-mount options of path in this (the
// host's) mount namespace, or "" if it is not a mount point.
func hostMountOptions(path string) string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 5 && f[4] == path {
			return f[5]
		}
	}
	return ""
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

// deleteModelPod deletes a pod and checks its volume was unpublished: the
// target is neither mounted nor present on the host.
func deleteModelPod(t *testing.T, pod *corev1.Pod, volume string) {
	t.Helper()
	target := hostTarget(pod, volume)
	deletePod(t, pod)
	if len(cluster.MountPoints(target)) > 0 {
		t.Errorf("%s is still mounted after its pod was deleted", target)
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still exists after its pod was deleted (%v)", target, err)
	}
}

// deleteModelPods deletes the model pods a failed test left, while the
// node plugin still runs to unpublish them.
func deleteModelPods(t *testing.T) {
	pods, err := suite.cluster.Client.CoreV1().Pods(modelsNS).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Errorf("listing model pods: %v", err)
		return
	}
	for i := range pods.Items {
		deletePod(t, &pods.Items[i])
	}
}

func ensureNamespace(t *testing.T, ns string) {
	t.Helper()
	ctx := context.Background()
	_, err := suite.cluster.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatal(err)
	}
	waitFor(t, "service account default in "+ns, time.Minute, func() error {
		_, err := suite.cluster.Client.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

func ptr[T any](v T) *T { return &v }

func inode(t *testing.T, path string) [2]uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return [2]uint64{st.Dev, st.Ino}
}

// TestDeployKustomize installs deploy/kubernetes and runs every behaviour
// on the real node.
func TestDeployKustomize(t *testing.T) {
	ensureNamespace(t, modelsNS)
	installPlugin(t, "deploy/kubernetes", renderKustomize(t))
	t.Cleanup(func() { deleteModelPods(t) })
	r := newRemote(t)
	r.secret(t, seldonSecret, nil)
	uri, sums := model(t, "seed", 1, map[string]int{"config.json": 512, "tokenizer.json": 64 << 10, "weights/model.bin": 4 << 20})
	leases := leasesAtStart(t)

	var seed *corev1.Pod
	t.Run("SeldonInlineVolume_ReadyByteExact_Events", func(t *testing.T) {
		start := time.Now()
		pod := modelPod(t, "seldon-inline", inlineVolume(uri, seldonSecret, ptr(true)), true)
		pod, out := checkedPod(t, pod, 2*time.Minute)
		t.Logf("cold pod Ready in %s", time.Since(start).Round(100*time.Millisecond))
		wantModel(t, pod, out, sums)
		for _, reason := range []string{"ModelDownloading", "ModelDownloaded"} {
			if !hasEvent(modelsNS, pod.Name, reason) {
				t.Errorf("pod %s has no %s event; events: %s", pod.Name, reason, eventSummary(modelsNS, pod.Name))
			}
		}
		seed = pod
	})
	if seed == nil {
		t.FailNow()
	}
	t.Run("Peers_PublishRecordedForOtherNodes", func(t *testing.T) { wantPeerRecords(t, leases) })

	t.Run("SecondPod_FetchesNothing_ModelCached", func(t *testing.T) {
		r.proxy.Reset()
		start := time.Now()
		pod, out := checkedPod(t, modelPod(t, "second", inlineVolume(uri, seldonSecret, ptr(true)), true), time.Minute)
		t.Logf("warm pod Ready in %s", time.Since(start).Round(100*time.Millisecond))
		wantModel(t, pod, out, sums)
		if n := r.proxy.ObjectBytes(); n != 0 {
			t.Errorf("the second pod on the node fetched %d object bytes from the remote, want 0", n)
		}
		if !hasEvent(modelsNS, pod.Name, "ModelCached") {
			t.Errorf("pod %s has no ModelCached event; events: %s", pod.Name, eventSummary(modelsNS, pod.Name))
		}
		if inode(t, hostTarget(pod, "models")) != inode(t, hostTarget(seed, "models")) {
			t.Errorf("the two pods of one model were given different trees")
		}
		deleteModelPod(t, pod, "models")
	})

	t.Run("ReadOnlyEverywhere_WhateverThePodSays", func(t *testing.T) {
		cases := []struct {
			name          string
			volume        *bool
			mountReadOnly bool
		}{
			{"ro-volume", ptr(true), false},
			{"ro-mount", nil, true},
			{"ro-neither", nil, false},
			{"rw-volume", ptr(false), false},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				pod, out := checkedPod(t, modelPod(t, c.name, inlineVolume(uri, seldonSecret, c.volume), c.mountReadOnly), time.Minute)
				wantModel(t, pod, out, sums)
				wantReadOnlyOnHost(t, hostTarget(pod, "models"))
				deleteModelPod(t, pod, "models")
			})
		}
		wantReadOnlyOnHost(t, hostTarget(seed, "models"))
	})

	var static *corev1.Pod
	t.Run("StaticPV_SharesTheInlineTree", func(t *testing.T) {
		static = staticPVPod(t, r, uri)
		pod, out := checkedPod(t, static, time.Minute)
		static = pod
		wantModel(t, pod, out, sums)
		target := hostTarget(pod, "e2e-static-model")
		wantReadOnlyOnHost(t, target)
		if inode(t, target) != inode(t, hostTarget(seed, "models")) {
			t.Errorf("the static PV and the inline volume of one model were given different trees")
		}
	})

	t.Run("PluginRestart_MountsKeepServing_Recovered", func(t *testing.T) {
		if static == nil {
			t.Skip("needs the static PV pod")
		}
		old := pluginPod(t)
		if err := suite.cluster.Client.CoreV1().Pods("modelcache").Delete(context.Background(), old.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "a new plugin pod", 2*time.Minute, func() error {
			p, err := findPluginPod()
			if err != nil {
				return err
			}
			if p.UID == old.UID {
				return fmt.Errorf("still %s", p.Name)
			}
			return nil
		})
		waitDaemonSetReady(t, "modelcache", "modelcache-node", 2*time.Minute)
		fresh := pluginPod(t)
		waitFor(t, "the new plugin's recovery", time.Minute, func() error {
			if log := podLog(fresh, "modelcache"); !strings.Contains(log, "liveMounts=2") {
				return fmt.Errorf("its log has no liveMounts=2:\n%s", log)
			}
			return nil
		})
		for _, target := range []string{hostTarget(seed, "models"), hostTarget(static, "e2e-static-model")} {
			for name, sum := range sums {
				b, err := os.ReadFile(filepath.Join(target, name))
				if err != nil {
					t.Fatalf("reading %s after the plugin restarted: %v", name, err)
				}
				if s := sha256.Sum256(b); hex.EncodeToString(s[:]) != sum {
					t.Errorf("%s in %s changed across the plugin restart", name, target)
				}
			}
			wantReadOnlyOnHost(t, target)
		}
		deleteModelPod(t, static, "e2e-static-model")
		deleteModelPod(t, seed, "models")
	})

	t.Run("WrongSecret_FailedMountThenFixed", func(t *testing.T) {
		wrongURI, wrongSums := model(t, "wrong-secret", 3, map[string]int{"config.json": 256, "model.bin": 1 << 20})
		r.secret(t, "wrong-secret", func(m map[string]string) { m["RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY"] = "not-the-key" })
		pod := modelPod(t, "wrong-secret", inlineVolume(wrongURI, "wrong-secret", ptr(true)), true)
		waitFor(t, "a FailedMount event naming the refusal", 2*time.Minute, func() error {
			if hasEvent(modelsNS, pod.Name, "FailedMount", "PermissionDenied") {
				return nil
			}
			return fmt.Errorf("events: %s", eventSummary(modelsNS, pod.Name))
		})
		p, err := suite.cluster.Client.CoreV1().Pods(modelsNS).Get(context.Background(), pod.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.Phase != corev1.PodPending {
			t.Fatalf("pod with a wrong secret is %s, want Pending (ContainerCreating)", p.Status.Phase)
		}
		fixed := testenv.RcloneSecret("mys3", r.proxy.URL)
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "wrong-secret", Namespace: modelsNS}, StringData: fixed}
		if _, err := suite.cluster.Client.CoreV1().Secrets(modelsNS).Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		pod, out := checkedPod(t, pod, 3*time.Minute)
		wantModel(t, pod, out, wrongSums)
		deleteModelPod(t, pod, "models")
	})

	t.Run("NoSecretInPluginLogsOrEvents", func(t *testing.T) {
		// The "secrets stay in memory" invariant where operators look: the
		// plugin's own log (-v=2 in deploy/) and every event of the suite.
		if log := podLog(pluginPod(t), "modelcache"); strings.Contains(log, testenv.SecretKey) {
			t.Error("the node plugin's log holds the secret access key")
		}
		list, err := suite.cluster.Client.CoreV1().Events("").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range list.Items {
			if strings.Contains(ev.Message, testenv.SecretKey) {
				t.Errorf("event %s on %s holds the secret access key", ev.Reason, ev.InvolvedObject.Name)
			}
		}
	})

	t.Run("DownloadOutlastsKubeletDeadline_OneDownload_Progress", func(t *testing.T) {
		// One stream at 96 KiB/s: the 14 MiB file takes about 150 s, longer
		// than the 2 minutes kubelet gives one NodePublishVolume.
		const size = 14 << 20
		slowURI, slowSums := model(t, "slow", 4, map[string]int{"config.json": 128, "model.bin": size})
		slow := newRemote(t)
		slow.proxy.RateBytesPerSec.Store(96 << 10)
		slow.secret(t, "slow-secret", nil)
		start := time.Now()
		pod := modelPod(t, "slow", inlineVolume(slowURI, "slow-secret", ptr(true)), true)
		pod, out := checkedPod(t, pod, 8*time.Minute)
		took := time.Since(start)
		t.Logf("slow pod Ready in %s", took.Round(time.Second))
		wantModel(t, pod, out, slowSums)
		if took < 2*time.Minute {
			t.Errorf("the download took %s, not longer than kubelet's 2-minute publish deadline; the test proves nothing", took)
		}
		if gets, bytes := slow.proxy.ObjectGets(), slow.proxy.ObjectBytes(); gets != 2 || bytes != size+128 {
			t.Errorf("the remote served %d GETs and %d bytes, want one download: 2 GETs and %d bytes", gets, bytes, size+128)
		}
		if !hasEvent(modelsNS, pod.Name, "ModelDownloadProgress") {
			t.Errorf("pod %s has no ModelDownloadProgress event; events: %s", pod.Name, eventSummary(modelsNS, pod.Name))
		}
		deleteModelPod(t, pod, "models")
	})
}

// staticPVPod creates a hand-written PV of the model (as
// deploy/examples/static-pv.yaml), a ReadOnlyMany claim bound to it and a
// pod that mounts the claim.
func staticPVPod(t *testing.T, r *remote, uri string) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	c := suite.cluster.Client
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "e2e-static-model"},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			ClaimRef:                      &corev1.ObjectReference{Namespace: modelsNS, Name: "static-model"},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: "modelcache.csi.dev", VolumeHandle: "e2e-static-model", ReadOnly: true,
				VolumeAttributes:     map[string]string{"modelUri": uri},
				NodePublishSecretRef: &corev1.SecretReference{Name: seldonSecret, Namespace: modelsNS},
			}},
		},
	}
	if _, err := c.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "static-model", Namespace: modelsNS},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany},
			StorageClassName: ptr(""),
			VolumeName:       pv.Name,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}
	if _, err := c.CoreV1().PersistentVolumeClaims(modelsNS).Create(ctx, pvc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.CoreV1().PersistentVolumeClaims(modelsNS).Delete(ctx, pvc.Name, metav1.DeleteOptions{})
		_ = c.CoreV1().PersistentVolumes().Delete(ctx, pv.Name, metav1.DeleteOptions{})
	})
	vol := corev1.Volume{Name: "model", VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: pvc.Name, ReadOnly: true}}}
	return modelPod(t, "static-pv", vol, true)
}

// TestDeployHelm installs the Helm chart's output the same way and checks
// a cold publish, read-only everywhere and unpublish through it.
func TestDeployHelm(t *testing.T) {
	ensureNamespace(t, modelsNS)
	reg := startRegistry(t)
	installPlugin(t, "deploy/helm/modelcache", withPlainHTTPRegistry(t, renderHelm(t), reg.Host))
	t.Cleanup(func() { deleteModelPods(t) })
	r := newRemote(t)
	r.secret(t, seldonSecret, nil)
	uri, sums := model(t, "helm", 5, map[string]int{"config.json": 300, "weights/model.bin": 2 << 20})
	pod, out := checkedPod(t, modelPod(t, "helm-cold", inlineVolume(uri, seldonSecret, nil), false), 2*time.Minute)
	wantModel(t, pod, out, sums)
	wantReadOnlyOnHost(t, hostTarget(pod, "models"))
	if r.proxy.ObjectBytes() == 0 {
		t.Errorf("the cold publish through the Helm install fetched nothing from the remote")
	}
	deleteModelPod(t, pod, "models")

	t.Run("HubModel_ByteExact_EventsNameTheCommit", hubModel)
	t.Run("RegistryModel_ByteExact_EventsNameTheManifest", registryModel(reg))
}
