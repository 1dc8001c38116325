package store_test

import (
	"testing"

	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// The real store passes the store.Content conformance suite.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Content { return openStore(t, newIndex()) })
}
