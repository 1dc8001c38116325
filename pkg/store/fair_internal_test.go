package store

import (
	"context"
	"testing"
	"time"
)

// The share of each download is the bound divided by the downloads using
// it, rounded up; one alone has the whole bound.
func TestFairSlots_Share(t *testing.T) {
	for _, tt := range []struct {
		size, users, want int
	}{
		{16, 1, 16}, {16, 2, 8}, {16, 3, 6}, {16, 17, 1}, {1, 2, 1},
	} {
		f := newFairSlots(tt.size)
		ds := make([]*download, tt.users)
		for i := range ds {
			ds[i] = &download{}
			f.join(ds[i])
		}
		if got := f.share(ds[0]); got != tt.want {
			t.Errorf("size %d, %d users: share %d, want %d", tt.size, tt.users, got, tt.want)
		}
	}
}

// A download that took the whole bound alone is pressed once a second one
// joins; the second gets each slot the first gives back, and the first
// takes none back while over its share.
func TestFairSlots_SecondDownloadGetsFreedSlots(t *testing.T) {
	ctx := context.Background()
	f := newFairSlots(4)
	a, b := &download{}, &download{}
	f.join(a)
	for range 4 {
		if err := f.acquire(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	if f.pressed(a) {
		t.Fatal("a download alone is pressed")
	}
	f.join(b)
	if !f.pressed(a) {
		t.Fatal("a download over its share is not pressed")
	}
	got := make(chan error, 1)
	go func() { got <- f.acquire(ctx, b) }()
	f.release(a)
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the second download did not get the slot the first gave back")
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	f.release(a)
	if err := f.acquire(short, a); err == nil {
		t.Fatal("a download holding its share took another slot")
	}
	if err := f.acquire(ctx, b); err != nil {
		t.Fatal(err)
	}
	if f.inUse() != 4 {
		t.Errorf("%d slots in use, want 4", f.inUse())
	}
}
