package main

import (
	"errors"
	"fmt"
	"net/http"
	"syscall"

	"github.com/modelcache/modelcache/pkg/adminapi"
)

// explain turns the client's errors into what an operator can act on: how
// to reach the socket, that the node plugin predates this command, that
// Ctrl-C stopped the call.
func (a *app) explain(err error) error {
	var de *adminapi.DialError
	var se *adminapi.StatusError
	switch {
	case errors.As(err, &de):
		return dialHint(de)
	case errors.As(err, &se) && se.Foreign && (se.Status == http.StatusNotFound || se.Status == http.StatusMethodNotAllowed):
		return fmt.Errorf("%w (is the node plugin older than modelcachectl?)", err)
	case a.ctx.Err() != nil && errors.Is(err, a.ctx.Err()):
		return fmt.Errorf("interrupted: %w", a.ctx.Err())
	}
	return err
}

// dialHint says why the socket could not be reached, and what to do about it.
func dialHint(e *adminapi.DialError) error {
	const asRoot = "run modelcachectl as root on the node (sudo, or kubectl exec into the modelcache node plugin's pod)"
	switch {
	case errors.Is(e.Err, syscall.ENOENT):
		return fmt.Errorf("cannot reach the admin API: no socket at %s. Is the modelcache node plugin running on this node? If so, %s, or point --socket (or MODELCACHE_ADMIN_SOCKET) at its admin socket", e.Socket, asRoot)
	case errors.Is(e.Err, syscall.EACCES), errors.Is(e.Err, syscall.EPERM):
		return fmt.Errorf("cannot reach the admin API: permission denied on %s, which only root may open; %s", e.Socket, asRoot)
	case errors.Is(e.Err, syscall.ECONNREFUSED):
		return fmt.Errorf("cannot reach the admin API: nothing listens on %s; the modelcache node plugin is not running (or restarting) on this node; %s once it is up", e.Socket, asRoot)
	default:
		return fmt.Errorf("cannot reach the admin API on %s: %v; %s", e.Socket, e.Err, asRoot)
	}
}
