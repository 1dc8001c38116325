package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"

	"github.com/modelcache/modelcache/pkg/source/ocitest"
	modelspec "github.com/modelpack/model-spec/specs-go/v1"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// pushModelPack pushes files as a ModelPack model, one raw layer each, to
// host/name:tag with oras-go as ocitest's pushing account, as ocitest
// does. Each layer names its file in model-spec's filepath annotation and
// in OCI's title annotation, which oras pull names the files it writes by.
func pushModelPack(ctx context.Context, host, name, tag string, files map[string][]byte) error {
	repo, err := remote.NewRepository(host + "/" + name)
	if err != nil {
		return err
	}
	repo.PlainHTTP = true
	repo.Client = &auth.Client{
		Client:     &http.Client{Transport: &http.Transport{}},
		Credential: auth.StaticCredential(host, auth.Credential{Username: ocitest.PushUser, Password: ocitest.PushPassword}),
		Cache:      auth.NewCache(),
	}
	push := func(desc ocispec.Descriptor, data []byte) error {
		if ok, err := repo.Exists(ctx, desc); err == nil && ok {
			return nil
		}
		if err := repo.Push(ctx, desc, bytes.NewReader(data)); err != nil {
			return fmt.Errorf("pushing %s of %s: %w", desc.Digest, name, err)
		}
		return nil
	}
	layers := []ocispec.Descriptor{}
	for _, p := range slices.Sorted(maps.Keys(files)) {
		mediaType := modelspec.MediaTypeModelWeightRaw
		if !strings.HasSuffix(p, ".safetensors") {
			mediaType = modelspec.MediaTypeModelWeightConfigRaw
		}
		desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(files[p]), Size: int64(len(files[p])),
			Annotations: map[string]string{modelspec.AnnotationFilepath: p, ocispec.AnnotationTitle: p}}
		if err := push(desc, files[p]); err != nil {
			return err
		}
		layers = append(layers, desc)
	}
	cfg := []byte(`{"descriptor":{"name":"` + name + `"},"modelfs":{"type":"layers","diffIds":[]},"config":{}}`)
	cfgDesc := ocispec.Descriptor{MediaType: modelspec.MediaTypeModelConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
	if err := push(cfgDesc, cfg); err != nil {
		return err
	}
	body, err := json.Marshal(ocispec.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: modelspec.ArtifactTypeModelManifest,
		Config:       cfgDesc,
		Layers:       layers,
	})
	if err != nil {
		return err
	}
	man := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(body), Size: int64(len(body))}
	if err := repo.PushReference(ctx, man, bytes.NewReader(body), tag); err != nil {
		return fmt.Errorf("pushing the manifest of %s:%s: %w", name, tag, err)
	}
	return nil
}
