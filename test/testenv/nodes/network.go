package nodes

import (
	"context"
	"fmt"
	"net"
	"strconv"
)

// network is the fleet's wiring: a hub namespace holding a bridge, and
// one namespace per node with a veth to it. Nothing of it is in the
// test's own namespace: the servers the nodes need (the API server, the
// origin's proxy) listen on the hub's address, from the hub namespace.
type network struct {
	id     string
	hub    *Netns
	hubIP  string
	subnet string // the first three octets
	nodes  []*Netns
}

// The bridge's name inside the hub; the hub is the run's own namespace,
// so it needs no unique name.
const bridge = "br0"

// newNetwork makes the hub and its bridge.
func newNetwork(id string) (nw *network, err error) {
	nw = &network{id: id, subnet: "10.77.0"}
	nw.hubIP = nw.subnet + ".1"
	if nw.hub, err = newNetns("mc" + id + "-hub"); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			nw.remove()
		}
	}()
	for _, args := range [][]string{
		{"link", "add", bridge, "type", "bridge"},
		{"addr", "add", nw.hubIP + "/24", "dev", bridge},
		{"link", "set", bridge, "up"},
	} {
		if err := ip(append([]string{"-n", nw.hub.Name}, args...)...); err != nil {
			return nil, err
		}
	}
	return nw, nil
}

// nodeIP is the address of the i-th namespace on the bridge.
func (nw *network) nodeIP(i int) string { return fmt.Sprintf("%s.%d", nw.subnet, 10+i) }

// addNetns makes the i-th node namespace, its veth to the bridge and its
// address.
func (nw *network) addNetns(i int) (*Netns, string, error) {
	if 10+i > 250 {
		return nil, "", fmt.Errorf("a fleet has at most 240 namespaces")
	}
	n, err := newNetns(fmt.Sprintf("mc%s-n%d", nw.id, i))
	if err != nil {
		return nil, "", err
	}
	addr := nw.nodeIP(i)
	hubEnd := fmt.Sprintf("v%sn%d", nw.id, i)
	for _, args := range [][]string{
		{"-n", nw.hub.Name, "link", "add", hubEnd, "type", "veth", "peer", "name", "eth0", "netns", n.Name},
		{"-n", nw.hub.Name, "link", "set", hubEnd, "master", bridge, "up"},
		{"-n", n.Name, "addr", "add", addr + "/24", "dev", "eth0"},
		{"-n", n.Name, "link", "set", "eth0", "up"},
	} {
		if err := ip(args...); err != nil {
			_ = n.remove()
			return nil, "", err
		}
	}
	nw.nodes = append(nw.nodes, n)
	return n, addr, nil
}

// forwardToHost serves a hub port that relays to addr in the test's own
// namespace (a loopback server), and returns the relay.
func (nw *network) forwardToHost(addr string) (*Relay, error) {
	ln, err := nw.hub.Listen(net.JoinHostPort(nw.hubIP, "0"))
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	return newRelay(ln, addr, d.DialContext), nil
}

// tap puts a counting relay on the path from namespace from to the peer
// port of the node at toIP: a relay in the hub, reached from from by a
// DNAT rule (so the client still dials, and TLS still checks, toIP).
func (nw *network) tap(from *Netns, toIP string, port int) (*Relay, error) {
	ln, err := nw.hub.Listen(net.JoinHostPort(nw.hubIP, "0"))
	if err != nil {
		return nil, err
	}
	target := net.JoinHostPort(toIP, strconv.Itoa(port))
	r := newRelay(ln, target, nw.hub.DialContext)
	err = from.Run("iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", toIP, "--dport", strconv.Itoa(port),
		"-j", "DNAT", "--to-destination", r.Addr())
	if err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// listenInHub opens a listener on the hub's address.
func (nw *network) listenInHub(port int) (net.Listener, error) {
	return nw.hub.Listen(net.JoinHostPort(nw.hubIP, strconv.Itoa(port)))
}

// DialContext dials from the hub: every node's address is reachable
// there.
func (nw *network) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return nw.hub.DialContext(ctx, network, addr)
}

// remove deletes every namespace of the network, nodes first.
func (nw *network) remove() {
	for i := len(nw.nodes) - 1; i >= 0; i-- {
		_ = nw.nodes[i].remove()
	}
	nw.nodes = nil
	if nw.hub != nil {
		_ = nw.hub.remove()
	}
}
