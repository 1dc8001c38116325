package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
)

// Machine describes where the numbers were taken.
type Machine struct {
	CPU, Kernel, CacheFS, GoVersion string
	Cores                           int
	RAM                             int64
	Rclone, RcloneLib, MinIO        string
	Driver                          string
	DropCaches                      bool
	NoDropReason                    string // why the page cache was not dropped
	LoadStart, LoadEnd              string // /proc/loadavg's 1, 5 and 15 minute averages
}

// loadAverage is the first three fields of /proc/loadavg.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// describeMachine reads the machine, the filesystem holding dir and the
// versions of every program the benchmark runs.
func describeMachine(o *options, dir string) (Machine, error) {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version(), CPU: "unknown", LoadStart: loadAverage()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				m.RAM = kb << 10
			}
		}
	}
	var u syscall.Utsname
	if err := syscall.Uname(&u); err == nil {
		m.Kernel = cString(u.Sysname[:]) + " " + cString(u.Release[:])
	}
	m.CacheFS = filesystemOf(dir)

	out, err := exec.Command(o.Rclone, "version").Output()
	if err != nil {
		return m, fmt.Errorf("running %s version: %w", o.Rclone, err)
	}
	m.Rclone = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	m.RcloneLib = rcloneLibVersion()
	if v := strings.TrimPrefix(m.Rclone, "rclone "); m.RcloneLib != "" && !strings.HasPrefix(v, m.RcloneLib) {
		return m, fmt.Errorf("the rclone CLI is %s but the driver links rclone %s: the comparison needs the same version (make bench builds bin/rclone at go.mod's version)", v, m.RcloneLib)
	}
	if out, err := exec.Command(o.Driver, "--version").Output(); err == nil {
		m.Driver = strings.TrimSpace(string(out))
	} else {
		return m, fmt.Errorf("running %s --version: %w", o.Driver, err)
	}
	m.MinIO = makefilePin("MINIO_VERSION")
	return m, nil
}

// cString converts a NUL-terminated utsname field.
func cString(b []int8) string {
	var s strings.Builder
	for _, c := range b {
		if c == 0 {
			break
		}
		s.WriteByte(byte(c))
	}
	return s.String()
}

// rcloneLibVersion is the rclone module version this program (and the
// driver, from the same go.mod) links.
func rcloneLibVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	for _, d := range bi.Deps {
		if d.Path == "github.com/rclone/rclone" {
			return d.Version
		}
	}
	return ""
}

// makefilePin returns the value of a `NAME := value` line of the Makefile.
func makefilePin(name string) string {
	b, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "Makefile"))
	if err != nil {
		return "unknown"
	}
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `\s*:=\s*(\S+)`)
	if m := re.FindSubmatch(b); m != nil {
		return string(m[1])
	}
	return "unknown"
}

// filesystemOf names the filesystem type and device of the mount holding
// dir, from the longest matching mount point in mountinfo.
func filesystemOf(dir string) string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	best, fs := "", "unknown"
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if sep < 0 || len(fields) < 5 || len(fields) < sep+3 {
			continue
		}
		mp := unescapeMount(fields[4])
		if (dir == mp || strings.HasPrefix(dir, strings.TrimSuffix(mp, "/")+"/")) && len(mp) >= len(best) {
			best, fs = mp, fields[sep+1]+" ("+fields[sep+2]+" on "+mp+")"
		}
	}
	return fs
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// dropCaches writes back dirty pages and drops the page cache, so the next
// measurement reads from disk; it reports whether the kernel let it.
func dropCaches() bool {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0) == nil
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	slices.SortFunc(out, func(a, b string) int { return len(b) - len(a) })
	return out
}

// unmountUnder detaches every mount left below dir, so removing dir never
// reaches into a mount.
func unmountUnder(dir string) {
	for _, mp := range mountsUnder(dir) {
		_ = syscall.Unmount(mp, syscall.MNT_DETACH)
	}
}

// pidServing finds the process whose command line serves the CSI socket:
// testenv.Driver does not expose its pid.
func pidServing(socket string) (int, error) {
	want := []byte("--endpoint=unix://" + socket)
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if slices.ContainsFunc(bytes.Split(cmd, []byte{0}), func(a []byte) bool { return bytes.Equal(a, want) }) {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no process serves %s", socket)
}

// peakRSS is VmHWM of a process in bytes: the most resident memory it has
// held since it started.
func peakRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmHWM in /proc/" + strconv.Itoa(pid) + "/status")
}

// rcloneRun is one run of the rclone CLI.
type rcloneRun struct {
	took    time.Duration
	peakRSS int64 // bytes, from the child's rusage
}

// rcloneCopy runs `rclone copy src dst` the way Seldon's storage
// initializer does: the remote defined only by RCLONE_CONFIG_<NAME>_*
// variables in the child's environment (from the same secret the driver
// gets), no config file. The time covers exactly start to exit.
func rcloneCopy(ctx context.Context, bin, conf string, secret map[string]string, src, dst string) (rcloneRun, error) {
	cmd := exec.CommandContext(ctx, bin, "copy", src, dst)
	cmd.Env = rcloneEnv(conf, secret)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return rcloneRun{}, fmt.Errorf("starting rclone: %w", err)
	}
	done := make(chan struct{})
	peak := make(chan int64, 1)
	go func() { peak <- pollPeakRSS(cmd.Process.Pid, done) }()
	err := cmd.Wait()
	took := time.Since(start)
	close(done)
	r := rcloneRun{took: took, peakRSS: <-peak}
	if err != nil {
		return rcloneRun{}, fmt.Errorf("rclone copy %s %s: %w\n%s", src, dst, err, out.String())
	}
	return r, nil
}

// pollPeakRSS reads a child's VmHWM every 10 ms until done and returns the
// last value read. The child's rusage cannot be used: Go starts children
// with vfork semantics, so the kernel folds this process's own peak RSS
// (gigabytes of generated model) into the child's ru_maxrss at exec.
// VmHWM only grows, so the last read is the peak up to at most 10 ms
// before the exit.
func pollPeakRSS(pid int, done <-chan struct{}) int64 {
	var last int64
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if v, err := peakRSS(pid); err == nil && v > last {
			last = v
		}
		select {
		case <-done:
			return last
		case <-tick.C:
		}
	}
}

// warmRclone runs `rclone version` so that the rclone binary is in the page
// cache after dropCaches, as the driver's running binary is: the timed copy
// then pays process start-up, not reading a 150 MB executable from disk.
func warmRclone(bin string) {
	_ = exec.Command(bin, "version").Run()
}

// rcloneEnv is this process's environment without any rclone or AWS
// setting, plus the secret and a config path that does not exist.
func rcloneEnv(conf string, secret map[string]string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "RCLONE_") || strings.HasPrefix(kv, "AWS_") {
			continue
		}
		env = append(env, kv)
	}
	for k, v := range secret {
		env = append(env, k+"="+v)
	}
	return append(env, "RCLONE_CONFIG="+conf)
}

// dirBytes sums the sizes of the regular files below dir.
func dirBytes(dir string) (n int64, files int, err error) {
	err = filepath.WalkDir(dir, func(_ string, e os.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() {
			return err
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		n += info.Size()
		files++
		return nil
	})
	return n, files, err
}
