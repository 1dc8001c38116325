package cluster

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// process is one component the cluster started, stopped by its PID only.
type process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and, after grace, SIGKILL.
func (p *process) stop(grace time.Duration) {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (c *Cluster) start(name, bin string, args ...string) error {
	log, err := os.Create(filepath.Join(c.cfg.Work, "logs", name+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	// If the suite itself dies, its components die with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); log.Close(); close(p.done) }()
	c.procs = append(c.procs, p)
	return nil
}

func (c *Cluster) proc(name string) *process {
	for _, p := range c.procs {
		if p.name == name {
			return p
		}
	}
	return nil
}

// Down stops everything Up started and undoes what it changed on the
// machine: pods first (so that the node plugin, while it still runs,
// unpublishes their volumes), then kubelet, the containers containerd
// still runs, the control plane and containerd; then every mount under
// kubelet's and the cluster's directories, the bridge and IP forwarding.
func (c *Cluster) Down() {
	if kubelet := c.proc("kubelet"); kubelet != nil && !kubelet.exited() && c.Client != nil {
		c.deleteAllPods()
	}
	if p := c.proc("kubelet"); p != nil {
		p.stop(15 * time.Second)
	}
	if p := c.proc("containerd"); p != nil && !p.exited() {
		c.removeContainers()
	}
	for i := len(c.procs) - 1; i >= 0; i-- {
		if !c.procs[i].exited() {
			c.procs[i].stop(15 * time.Second)
		}
	}
	c.killShims()
	unmountUnder(filepath.Join(c.cfg.Work) + "/")
	cleanKubeletDir()
	if c.ipForward != nil {
		_ = os.WriteFile("/proc/sys/net/ipv4/ip_forward", c.ipForward, 0o644)
	}
	_ = exec.Command("ip", "link", "del", "mce2e0").Run()
	if c.madeRunCtr {
		_ = os.RemoveAll("/run/containerd")
	}
}

// deleteAllPods deletes the DaemonSets and pods of every namespace and
// waits up to 90 s for kubelet to tear them down.
func (c *Cluster) deleteAllPods() {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	nss, err := c.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	grace := int64(5)
	// Model pods first, while the node plugin can still unpublish them.
	for _, pass := range []func(ns string) bool{
		func(ns string) bool { return ns != "modelcache" },
		func(ns string) bool { return ns == "modelcache" },
	} {
		for _, ns := range nss.Items {
			if !pass(ns.Name) {
				continue
			}
			_ = c.Client.AppsV1().DaemonSets(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
			_ = c.Client.CoreV1().Pods(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &grace}, metav1.ListOptions{})
		}
		for ctx.Err() == nil {
			left := 0
			for _, ns := range nss.Items {
				if pass(ns.Name) {
					pods, err := c.Client.CoreV1().Pods(ns.Name).List(ctx, metav1.ListOptions{})
					if err == nil {
						left += len(pods.Items)
					}
				}
			}
			if left == 0 {
				break
			}
			time.Sleep(time.Second)
		}
	}
}

// removeContainers kills what containerd still runs for Kubernetes.
func (c *Cluster) removeContainers() {
	ctr := func(args ...string) []string {
		out, _ := exec.Command("ctr", append([]string{"--address", c.CtrAddress, "-n", "k8s.io"}, args...)...).Output()
		return strings.Fields(string(out))
	}
	for _, t := range ctr("tasks", "ls", "-q") {
		ctr("tasks", "kill", "-s", "SIGKILL", t)
	}
	time.Sleep(2 * time.Second)
	for _, t := range ctr("tasks", "ls", "-q") {
		ctr("tasks", "delete", "-f", t)
	}
	for _, id := range ctr("containers", "ls", "-q") {
		ctr("containers", "delete", id)
	}
}

// killShims kills the runc shims of this cluster's containerd, which
// outlive it by design: those whose command line names its socket.
func (c *Cluster) killShims() {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		cmd := string(b)
		if strings.Contains(cmd, "containerd-shim") && strings.Contains(cmd, c.CtrAddress) {
			var pid int
			if _, err := fmt.Sscanf(f, "/proc/%d/cmdline", &pid); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
}

// cleanKubeletDir unmounts everything under KubeletDir and removes it, if
// this package made it.
func cleanKubeletDir() {
	if _, err := os.Stat(filepath.Join(KubeletDir, marker)); err != nil {
		return
	}
	unmountUnder(KubeletDir + "/")
	unmountUnder(KubeletDir)
	_ = os.RemoveAll(KubeletDir)
}

// unmountUnder unmounts every mount point whose path starts with prefix,
// deepest first; lazily when a mount is busy.
func unmountUnder(prefix string) {
	for range 3 {
		points := MountPoints(prefix)
		if len(points) == 0 {
			return
		}
		sort.Sort(sort.Reverse(sort.StringSlice(points)))
		for _, m := range points {
			if err := syscall.Unmount(m, 0); err != nil {
				_ = syscall.Unmount(m, syscall.MNT_DETACH)
			}
		}
	}
}

// MountPoints lists this namespace's mount points whose path starts with prefix.
func MountPoints(prefix string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && strings.HasPrefix(unescape(fields[4]), prefix) {
			out = append(out, unescape(fields[4]))
		}
	}
	return out
}

// unescape undoes mountinfo's octal escapes of space, tab, newline and backslash.
func unescape(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// ProcessesMentioning lists the processes whose command line contains s
// (the cluster's work directory names every component's config, socket or
// data), as "pid: command".
func ProcessesMentioning(s string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil || !strings.Contains(string(b), s) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(f, "/proc/%d/cmdline", &pid); err == nil && pid != os.Getpid() {
			out = append(out, fmt.Sprintf("%d: %s", pid, strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")))
		}
	}
	return out
}
