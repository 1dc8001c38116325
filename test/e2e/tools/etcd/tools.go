//go:build tools

// Package tools pins the etcd binary make e2e builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
