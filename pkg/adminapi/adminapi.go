// Package adminapi holds the wire types of the node plugin's operator API
// (pkg/admin serves them) and its one typed client (Client: modelcachectl
// and the tests call the node plugin through it). It imports only the
// standard library, so the CLI links no rclone backend, and it is the only
// definition of the JSON an operator's scripts see: the state database's
// records (pkg/state) are separate types that may change without breaking
// the API.
package adminapi

import "time"

// Ref is a published volume using a tree.
type Ref struct {
	VolumeID   string    `json:"volumeID"`
	TargetPath string    `json:"targetPath"`
	Tree       string    `json:"tree"`
	ArgsHash   string    `json:"argsHash"`
	URI        string    `json:"uri"`
	Revision   string    `json:"revision,omitempty"`
	PodName    string    `json:"podName,omitempty"`
	PodNS      string    `json:"podNamespace,omitempty"`
	PodUID     string    `json:"podUID,omitempty"`
	Published  time.Time `json:"published"`
}

// Tree is one cached model: GET /v1/trees returns a list of them.
type Tree struct {
	Digest string   `json:"digest"`
	Size   int64    `json:"size"`
	Files  int      `json:"files"`
	URIs   []string `json:"uris"`
	// Revisions are the Hub commits and OCI manifest digests the URIs
	// resolved to.
	Revisions []string  `json:"revisions,omitempty"`
	LastUsed  time.Time `json:"lastUsed"`
	Refs      []Ref     `json:"refs"`
	Pinned    bool      `json:"pinned"`
	PinnedAt  time.Time `json:"pinnedAt,omitzero"`
	// Doomed is why the tree goes when its last mount goes ("operator",
	// "drain"), or "".
	Doomed  string `json:"doomed,omitempty"`
	Present bool   `json:"present"` // the tree directory exists
	// From is where this node's downloads of the tree read its bytes;
	// absent when nothing was recorded (a tree cached before this was
	// kept, or every object linked from earlier downloads).
	From BytesFrom `json:"from,omitzero"`
}

// BytesFrom says where downloads read a tree's bytes: from its origin (the
// model's remote) and from peers (other nodes). A range read again after a
// cut counts again, and objects linked from earlier downloads count
// nowhere, so the sum need not be the tree's size.
type BytesFrom struct {
	Origin int64 `json:"origin"`
	Peers  int64 `json:"peers"`
	// Nodes are the peers that sent most, most first (at most eight);
	// Peers counts every peer.
	Nodes []NodeBytes `json:"nodes,omitempty"`
}

// IsZero reports whether nothing was recorded.
func (b BytesFrom) IsZero() bool { return b.Origin == 0 && b.Peers == 0 }

// NodeBytes is what one peer node sent.
type NodeBytes struct {
	Node  string `json:"node"`
	Bytes int64  `json:"bytes"`
}

// File is one file of a tree.
type File struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	Sha256 string `json:"sha256"`
}

// Inspection is a tree with its files (GET /v1/tree; "files" is their count).
type Inspection struct {
	Tree
	Contents []File `json:"contents"`
}

// DiskUsage is what du reports (GET /v1/du).
type DiskUsage struct {
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

// RefRequest names a tree by digest or by a model URI it was fetched as;
// the body of pin, unpin, evict and gc.
type RefRequest struct {
	Ref        string `json:"ref"`
	WhenUnused bool   `json:"whenUnused,omitempty"`
	DryRun     bool   `json:"dryRun,omitempty"`
}

// EvictResult says what evict did.
type EvictResult struct {
	Tree    string `json:"tree"`
	Removed bool   `json:"removed"`
	Freed   int64  `json:"freed"`
	// Pending: in use, and marked to go when its last mount goes.
	Pending bool `json:"pending"`
}

// Candidate is a tree gc removes, or would remove.
type Candidate struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// GCResult is what gc did, or would do with DryRun (POST /v1/gc).
type GCResult struct {
	Evicted []Candidate `json:"evicted"`
	Freed   int64       `json:"freed"`
	Over    int64       `json:"over"` // bytes still over budget afterwards
	DryRun  bool        `json:"dryRun"`
	// Warning says why the budget still cannot be met, if it cannot.
	Warning string `json:"warning,omitempty"`
}

// DrainResult says what drain or undrain did.
type DrainResult struct {
	Drained bool     `json:"drained"`
	Removed []string `json:"removed"`
	Freed   int64    `json:"freed"`
	Pending []string `json:"pending"` // in use; removed when their last mount goes
}

// VerifyReport is what verify found and did.
type VerifyReport struct {
	Blobs       int      `json:"blobs"`
	Bytes       int64    `json:"bytes"`
	Corrupt     []string `json:"corrupt"`
	Damaged     []string `json:"damaged"`
	Took        string   `json:"took"`
	Quarantined []string `json:"quarantined"`
	Removed     []string `json:"removed"`     // damaged trees no pod used: removed
	Invalidated []string `json:"invalidated"` // damaged trees in use: no longer served, repaired by the next download
	OK          bool     `json:"ok"`
}

// PrefetchRequest warms the cache with a model. Secrets are the keys of the
// node-publish secret pods use (RCLONE_CONFIG_<REMOTE>_*, AWS_*, ...).
type PrefetchRequest struct {
	URI     string            `json:"uri"`
	Secrets map[string]string `json:"secrets"`
}

// PrefetchEvent is one line of a prefetch's newline-delimited JSON reply:
// "progress" lines while the download runs, then one "done" or "error".
type PrefetchEvent struct {
	Event string `json:"event"`
	Done  int64  `json:"done,omitempty"`
	Total int64  `json:"total,omitempty"`
	Tree  string `json:"tree,omitempty"`
	// Revision is the Hub commit or OCI manifest digest the URI resolved to.
	Revision string `json:"revision,omitempty"`
	Files    int    `json:"files,omitempty"`
	Fetched  bool   `json:"fetched,omitempty"` // false: it was already cached
	Took     string `json:"took,omitempty"`
	Error    string `json:"error,omitempty"`
}

// Error is the body of every failed call.
type Error struct {
	Error string `json:"error"`
}
