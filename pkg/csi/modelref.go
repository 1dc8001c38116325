package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/source"
)

// modelRef is the model a volume names: the publish inputs shared by inline
// volumes, static PVs and StorageClass-provisioned volumes.
type modelRef struct {
	URI, Policy, Digest string
}

// parseModelRef reads a model reference from volume attributes or
// StorageClass parameters. noun says which of the two the operator wrote
// ("volume attribute", "StorageClass parameter") so errors point at the
// right place.
func parseModelRef(attrs map[string]string, noun string) (modelRef, error) {
	if err := checkModelAttrs(attrs, noun); err != nil {
		return modelRef{}, err
	}
	m := modelRef{URI: attrs[AttrModelURI], Policy: attrs[AttrPullPolicy], Digest: attrs[AttrDigest]}
	if m.URI == "" {
		return m, fmt.Errorf("%s %s is required, e.g. %s: \"mys3:bucket/model\"", noun, AttrModelURI, AttrModelURI)
	}
	if m.Policy == "" {
		m.Policy = PullIfNotPresent
	}
	return m, nil
}

// checkModelAttrs checks the keys and whichever values are present.
// Namespaced keys ("csi.storage.k8s.io/...") are added by Kubernetes and
// ignored; any other unknown key is a typo worth refusing.
func checkModelAttrs(attrs map[string]string, noun string) error {
	for k := range attrs {
		if !strings.Contains(k, "/") && k != AttrModelURI && k != AttrPullPolicy && k != AttrDigest {
			return fmt.Errorf("unknown %s %q: the %ss are %s (required), %s and %s", noun, k, noun, AttrModelURI, AttrPullPolicy, AttrDigest)
		}
	}
	if uri, ok := attrs[AttrModelURI]; ok && uri == "" {
		return fmt.Errorf("%s %s is empty; name a model, e.g. %s: \"mys3:bucket/model\"", noun, AttrModelURI, AttrModelURI)
	}
	return checkModelValues(attrs[AttrModelURI], attrs[AttrPullPolicy], attrs[AttrDigest], func(attr string) string {
		return noun + " " + attr
	})
}

// checkModelValues validates the non-empty values of a reference. name
// turns an attribute name into the words the operator wrote it under.
func checkModelValues(uri, policy, digest string, name func(attr string) string) error {
	if uri != "" {
		if _, err := source.ParseURI(uri); err != nil {
			return fmt.Errorf("%s: %w", name(AttrModelURI), err)
		}
	}
	switch policy {
	case "", PullIfNotPresent, PullAlways, PullNever:
	default:
		return fmt.Errorf("%s is %q; use %s, %s or %s", name(AttrPullPolicy), policy, PullIfNotPresent, PullAlways, PullNever)
	}
	if digest != "" && !cache.ValidDigest(digest) {
		return fmt.Errorf("%s is %q; it must be sha256: followed by 64 lowercase hex digits (see modelcachectl ls)", name(AttrDigest), digest)
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
