package nodes

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns` keeps the namespaces it names: nsenter
// --net and setns(2) enter them by these paths.
const netnsDir = "/run/netns/"

// Netns is a named network namespace the fleet made. Only the network is
// separate: the mount namespace stays the test's, so a plugin's bind
// mounts are the test's to read.
type Netns struct {
	Name string
}

// Path is the namespace's file, for nsenter --net=.
func (n *Netns) Path() string { return netnsDir + n.Name }

// newNetns makes a namespace with its loopback up.
func newNetns(name string) (*Netns, error) {
	if err := ip("netns", "add", name); err != nil {
		return nil, err
	}
	n := &Netns{Name: name}
	if err := ip("-n", name, "link", "set", "lo", "up"); err != nil {
		n.remove()
		return nil, err
	}
	return n, nil
}

// remove deletes the namespace: its interfaces (the veth ends, the
// bridge) go with it, and the veth peer with its other end.
func (n *Netns) remove() error {
	return ip("netns", "delete", n.Name)
}

// Run runs a command (iptables, ip) inside the namespace.
func (n *Netns) Run(name string, args ...string) error {
	return run("nsenter", append([]string{"--net=" + n.Path(), "--", name}, args...)...)
}

// Do runs fn on an OS thread inside the namespace. A socket keeps the
// namespace it was made in: a listener opened or a connection dialled in
// fn stays there, whatever thread serves it later. The caller's thread is
// never moved; the thread that ran fn goes back to the test's namespace,
// or, if it cannot, ends with its goroutine.
func (n *Netns) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		back, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening this thread's network namespace: %w", err)
			return
		}
		defer unix.Close(back)
		target, err := unix.Open(n.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening network namespace %s: %w", n.Name, err)
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace %s: %w", n.Name, err)
			return
		}
		err = fn()
		if unix.Setns(back, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Listen opens a TCP listener inside the namespace.
func (n *Netns) Listen(addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listening on %s in %s: %w", addr, n.Name, err)
	}
	return l, nil
}

// DialContext dials from inside the namespace (a net.Dialer's
// DialContext, for an http.Transport).
func (n *Netns) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

func ip(args ...string) error { return run("ip", args...) }

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// runID is a short random name part: namespaces and links of concurrent
// runs (another test binary, another worker) never meet.
func runID() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// checkNetnsSupport says why this process cannot make the fleet's
// namespaces, or nil.
func checkNetnsSupport() error {
	if os.Geteuid() != 0 {
		return errors.New("the node fleet needs root (network namespaces, bind mounts)")
	}
	for _, tool := range []string{"ip", "nsenter", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("the node fleet needs %s: %w", tool, err)
		}
	}
	return nil
}
