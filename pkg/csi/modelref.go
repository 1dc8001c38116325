package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/store"
)

// modelRef is the model a volume names: the publish inputs shared by inline
// volumes, static PVs and StorageClass-provisioned volumes.
type modelRef struct {
	URI, Policy, Digest string
}

// parseModelRef reads a model reference from volume attributes or
// StorageClass parameters. noun says which of the two the operator wrote
// ("volume attribute", "StorageClass parameter") so errors point at the
// right place. Namespaced keys ("csi.storage.k8s.io/...") are added by
// Kubernetes and ignored; any other unknown key is a typo worth refusing.
func parseModelRef(attrs map[string]string, noun string) (modelRef, error) {
	for k := range attrs {
		if !strings.Contains(k, "/") && k != AttrModelURI && k != AttrPullPolicy && k != AttrDigest {
			return modelRef{}, fmt.Errorf("unknown %s %q: the %ss are %s (required), %s and %s", noun, k, noun, AttrModelURI, AttrPullPolicy, AttrDigest)
		}
	}
	m := modelRef{URI: attrs[AttrModelURI], Policy: attrs[AttrPullPolicy], Digest: attrs[AttrDigest]}
	if m.URI == "" {
		return m, fmt.Errorf("%s %s is required, e.g. %s: \"mys3:bucket/model\"", noun, AttrModelURI, AttrModelURI)
	}
	return m, m.check(noun)
}

// check validates the values of a reference, defaulting the pull policy.
func (m *modelRef) check(noun string) error {
	if _, err := source.ParseURI(m.URI); err != nil {
		return fmt.Errorf("%s %s: %w", noun, AttrModelURI, err)
	}
	switch m.Policy {
	case "":
		m.Policy = PullIfNotPresent
	case PullIfNotPresent, PullAlways, PullNever:
	default:
		return fmt.Errorf("%s %s is %q; use %s, %s or %s", noun, AttrPullPolicy, m.Policy, PullIfNotPresent, PullAlways, PullNever)
	}
	if m.Digest != "" && !store.ValidDigest(m.Digest) {
		return fmt.Errorf("%s %s is %q; it must be sha256: followed by 64 lowercase hex digits (see modelcachectl ls)", noun, AttrDigest, m.Digest)
	}
	return nil
}

// volumeContext is the reference as the node reads it back from a PV.
func (m modelRef) volumeContext() map[string]string {
	vc := map[string]string{AttrModelURI: m.URI, AttrPullPolicy: m.Policy}
	if m.Digest != "" {
		vc[AttrDigest] = m.Digest
	}
	return vc
}

// hash identifies the reference for idempotency checks.
func (m modelRef) hash() string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s", m.URI, m.Policy, m.Digest)
	return hex.EncodeToString(h.Sum(nil))
}
