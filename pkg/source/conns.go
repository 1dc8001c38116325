package source

import (
	"sync"
	"time"
)

// connLinger is how long a remote keeps its connections once no request
// of its runs: long enough for the next step of the same fetch (the
// download after the listing, the credential check after the download) to
// reuse them, short enough that a burst of publishes does not hold a
// socket, and two splice pipes at the egress proxy, per connection for
// the minute rclone's transport would keep them idle.
const connLinger = time.Second

// activity counts a remote's running requests and closes its connections
// at the egress proxy connLinger after the last one ends. A remote is one
// publish's: its transport is never shared, so nothing else would close
// them.
type activity struct {
	mu    sync.Mutex
	busy  int
	timer *time.Timer
	close func() // closes the remote's connections; nil: nothing to close
}

// begin records a request starting; the function it returns records its
// end and may be called more than once.
func (a *activity) begin() (end func()) {
	if a == nil || a.close == nil {
		return func() {}
	}
	a.mu.Lock()
	a.busy++
	if a.timer != nil {
		a.timer.Stop()
		a.timer = nil
	}
	a.mu.Unlock()
	var once sync.Once
	return func() { once.Do(a.end) }
}

func (a *activity) end() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.busy--
	if a.busy > 0 {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(connLinger, func() {
		a.mu.Lock()
		idle := a.busy == 0 && a.timer == t
		if idle {
			a.timer = nil
		}
		a.mu.Unlock()
		if idle {
			a.close()
		}
	})
	a.timer = t
}
