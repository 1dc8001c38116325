package remotespec

import (
	"fmt"
	"regexp"
	"strings"

	"oras.land/oras-go/v2/registry"
)

var (
	// A Hub repository id: "model" or "org/model", each part letters,
	// digits, '.', '_' and '-' starting and ending with a letter or digit,
	// as huggingface_hub's validate_repo_id accepts (at most 96 in all, no
	// "--" or "..").
	hfRepoPart = regexp.MustCompile(`^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$`)
	// A revision: a branch, tag, refs/pr/N or commit, as git names refs
	// (no "..", no empty segment, no trailing ".lock").
	hfRevision = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$`)
)

// parseHF parses what follows "hf://": org/model[@revision].
func parseHF(rest string) (URI, error) {
	if strings.ContainsAny(rest, "?#") {
		return URI{}, fmt.Errorf("%w: modelUri carries a query or fragment; put the token in the node-publish secret (HF_TOKEN) and the revision after '@'; %s", ErrInvalid, formsHelp)
	}
	repo, rev, hasRev := strings.Cut(rest, "@")
	if !hasRev {
		rev = DefaultHFRevision
	}
	parts := strings.Split(repo, "/")
	if len(repo) > 96 || len(parts) > 2 || strings.Contains(repo, "--") || strings.Contains(repo, "..") {
		return URI{}, fmt.Errorf("%w: hf modelUri repository %q is not a Hub repository id (\"model\" or \"org/model\", at most 96 characters); %s", ErrInvalid, repo, formsHelp)
	}
	for _, p := range parts {
		if !hfRepoPart.MatchString(p) {
			return URI{}, fmt.Errorf("%w: hf modelUri repository %q is not a Hub repository id (\"model\" or \"org/model\": letters, digits, '.', '_' and '-'); %s", ErrInvalid, repo, formsHelp)
		}
	}
	if !hfRevision.MatchString(rev) || strings.Contains(rev, "..") || strings.Contains(rev, "//") ||
		strings.HasSuffix(rev, "/") || strings.HasSuffix(rev, ".lock") {
		return URI{}, fmt.Errorf("%w: hf modelUri revision %q is not a branch, tag, refs/pr/N or commit; %s", ErrInvalid, rev, formsHelp)
	}
	return URI{Scheme: SchemeHF, Path: repo, Ref: rev}, nil
}

// parseOCI parses what follows "oci://": registry/repository[:tag] or
// registry/repository@sha256:digest, with oras-go's reference rules.
func parseOCI(rest string) (URI, error) {
	if strings.ContainsAny(rest, "?#") {
		return URI{}, fmt.Errorf("%w: modelUri carries a query or fragment; put registry credentials in the node-publish secret (.dockerconfigjson); %s", ErrInvalid, formsHelp)
	}
	host, _, _ := strings.Cut(rest, "/")
	if strings.Contains(host, "@") {
		return URI{}, fmt.Errorf("%w: modelUri carries user info before the registry; put credentials in the node-publish secret (.dockerconfigjson); %s", ErrInvalid, formsHelp)
	}
	ref, err := registry.ParseReference(rest)
	if err != nil {
		return URI{}, fmt.Errorf("%w: oci modelUri is not registry/repository[:tag|@sha256:digest]: %v; %s", ErrInvalid, err, formsHelp)
	}
	if !validHostPort(ref.Registry) {
		return URI{}, fmt.Errorf("%w: oci modelUri registry %q is invalid (a host name or IPv4 address and an optional port); %s", ErrInvalid, ref.Registry, formsHelp)
	}
	switch {
	case ref.Reference == "":
		ref.Reference = DefaultOCITag
	case strings.Contains(ref.Reference, ":"):
		d, err := ref.Digest()
		if err != nil || d.Algorithm() != "sha256" {
			return URI{}, fmt.Errorf("%w: oci modelUri digest %q is not sha256:<64 hex digits>; %s", ErrInvalid, ref.Reference, formsHelp)
		}
	}
	return URI{Scheme: SchemeOCI, Host: ref.Registry, Path: ref.Repository, Ref: ref.Reference}, nil
}
