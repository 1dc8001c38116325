package main

import "time"

// The admin API's wire types, as pkg/admin encodes them. They are declared
// here rather than imported because pkg/admin links pkg/source and with it
// every rclone backend: importing it would make this CLI a 57 MB binary.
// api_test.go round-trips fully populated pkg/admin values through these
// types, so a change on either side fails the tests instead of drifting.

// cachedTree mirrors state.CachedTree; the first three fields come from an
// embedded store.Tree.
type cachedTree struct {
	Digest   string    `json:"digest"`
	Size     int64     `json:"size"`
	Files    int       `json:"files"`
	URIs     []string  `json:"uris"`
	LastUsed time.Time `json:"lastUsed"`
	Refs     []ref     `json:"refs"`
	Pinned   bool      `json:"pinned"`
	PinnedAt time.Time `json:"pinnedAt,omitzero"`
	Doomed   string    `json:"doomed,omitempty"`
}

// ref mirrors state.Ref.
type ref struct {
	VolumeID   string    `json:"volumeID"`
	TargetPath string    `json:"targetPath"`
	Tree       string    `json:"tree"`
	ArgsHash   string    `json:"argsHash"`
	URI        string    `json:"uri"`
	PodName    string    `json:"podName,omitempty"`
	PodNS      string    `json:"podNamespace,omitempty"`
	PodUID     string    `json:"podUID,omitempty"`
	Published  time.Time `json:"published"`
}

// tree mirrors admin.Tree: GET /v1/trees returns a list of them.
type tree struct {
	cachedTree
	Present bool `json:"present"`
}

// treeFile mirrors admin.File.
type treeFile struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	Sha256 string `json:"sha256"`
}

// inspection mirrors admin.Inspection (GET /v1/tree).
type inspection struct {
	tree
	FileList []treeFile `json:"contents"`
}

// diskUsage mirrors admin.DiskUsage (GET /v1/du).
type diskUsage struct {
	BlobBytes   int64 `json:"blobBytes"`
	Blobs       int   `json:"blobs"`
	TreeBytes   int64 `json:"treeBytes"`
	Trees       int   `json:"trees"`
	IngestBytes int64 `json:"ingestBytes"`
	Quarantined int   `json:"quarantined"`
	FSSize      int64 `json:"fsSize"`
	FSFree      int64 `json:"fsFree"`
	SavedBytes  int64 `json:"savedBytes"`
	Drained     bool  `json:"drained"`
}

// refRequest mirrors admin.RefRequest, the body of pin, unpin, evict and gc.
type refRequest struct {
	Ref        string `json:"ref"`
	WhenUnused bool   `json:"whenUnused,omitempty"`
	DryRun     bool   `json:"dryRun,omitempty"`
}

// evictResult mirrors admin.EvictResult.
type evictResult struct {
	Tree    string `json:"tree"`
	Removed bool   `json:"removed"`
	Freed   int64  `json:"freed"`
	Pending bool   `json:"pending"`
}

// candidate mirrors store.Candidate.
type candidate struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// gcResult mirrors admin.GCResult (POST /v1/gc).
type gcResult struct {
	Evicted []candidate `json:"evicted"`
	Freed   int64       `json:"freed"`
	Over    int64       `json:"over"`
	DryRun  bool        `json:"dryRun"`
	Warning string      `json:"warning,omitempty"`
}

// drainResult mirrors admin.DrainResult.
type drainResult struct {
	Drained bool     `json:"drained"`
	Removed []string `json:"removed"`
	Freed   int64    `json:"freed"`
	Pending []string `json:"pending"`
}

// verifyReport mirrors admin.VerifyReport.
type verifyReport struct {
	Blobs       int      `json:"blobs"`
	Bytes       int64    `json:"bytes"`
	Corrupt     []string `json:"corrupt"`
	Damaged     []string `json:"damaged"`
	Took        string   `json:"took"`
	Quarantined []string `json:"quarantined"`
	Removed     []string `json:"removed"`
	Invalidated []string `json:"invalidated"`
	OK          bool     `json:"ok"`
}

// prefetchRequest mirrors admin.PrefetchRequest.
type prefetchRequest struct {
	URI     string            `json:"uri"`
	Secrets map[string]string `json:"secrets"`
}

// prefetchEvent mirrors admin.PrefetchEvent, one line of the NDJSON reply.
type prefetchEvent struct {
	Event   string `json:"event"`
	Done    int64  `json:"done,omitempty"`
	Total   int64  `json:"total,omitempty"`
	Tree    string `json:"tree,omitempty"`
	Files   int    `json:"files,omitempty"`
	Fetched bool   `json:"fetched,omitempty"`
	Took    string `json:"took,omitempty"`
	Error   string `json:"error,omitempty"`
}

// apiErrorBody mirrors admin.Error, the body of every failed call.
type apiErrorBody struct {
	Error string `json:"error"`
}
