// Package keymutex serialises operations on one key (a target path, a
// volume name) while operations on other keys proceed in parallel.
package keymutex

import "sync"

// Map is a set of mutexes by key; the zero value is ready. A key's entry
// lives only while someone holds or waits for it.
type Map struct {
	mu    sync.Mutex
	locks map[string]*lock
}

type lock struct {
	sync.Mutex
	waiters int
}

// Lock locks key and returns its unlock function.
func (k *Map) Lock(key string) func() {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*lock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &lock{}
		k.locks[key] = l
	}
	l.waiters++
	k.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		k.mu.Lock()
		l.waiters--
		if l.waiters == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}

// Len is the number of keys someone holds or waits for.
func (k *Map) Len() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.locks)
}
