// Package images builds the container images of make e2e without Docker or
// a registry: single-layer images written as tarballs with
// go-containerregistry and imported into containerd with ctr.
package images

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image is a root filesystem, built from files of this machine.
type Image struct {
	Tag        string
	Entrypoint []string
	files      map[string]string // path in the image → file on this machine
	links      map[string]string // path in the image → symlink target
	dirs       map[string]bool
}

// New returns an empty image.
func New(tag string, entrypoint ...string) *Image {
	return &Image{Tag: tag, Entrypoint: entrypoint, files: map[string]string{}, links: map[string]string{}, dirs: map[string]bool{"tmp": true}}
}

// Add copies the file src (symlinks followed) to dst in the image.
func (im *Image) Add(dst, src string) *Image {
	im.files[strings.TrimPrefix(dst, "/")] = src
	return im
}

// Link makes dst a symlink to target.
func (im *Image) Link(dst, target string) *Image {
	im.links[strings.TrimPrefix(dst, "/")] = target
	return im
}

// AddWithLibraries adds an executable of this machine at the same path,
// with every shared library ldd says it loads.
func (im *Image) AddWithLibraries(bin string) error {
	im.Add(bin, bin)
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		return fmt.Errorf("ldd %s: %w", bin, err)
	}
	for _, f := range strings.Fields(string(out)) {
		if strings.HasPrefix(f, "/") {
			im.Add(f, f)
		}
	}
	return nil
}

// Write writes the image as a tarball that `ctr images import` takes.
func (im *Image) Write(out string) error {
	layer, err := im.layer()
	if err != nil {
		return err
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layer)), nil })
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, l)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Config.Entrypoint = im.Entrypoint
	cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	ref, err := name.ParseReference(im.Tag)
	if err != nil {
		return err
	}
	return tarball.WriteToFile(out, ref, img)
}

// layer is the image's root filesystem as one tar, every entry owned by
// root, parents before children.
func (im *Image) layer() ([]byte, error) {
	dirs := map[string]bool{}
	for d := range im.dirs {
		dirs[d] = true
	}
	for _, m := range []map[string]string{im.files, im.links} {
		for p := range m {
			for d := path.Dir(p); d != "."; d = path.Dir(d) {
				dirs[d] = true
			}
		}
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range slices.Sorted(maps.Keys(dirs)) {
		mode := int64(0o755)
		if d == "tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode}); err != nil {
			return nil, err
		}
	}
	for _, p := range slices.Sorted(maps.Keys(im.files)) {
		b, err := os.ReadFile(im.files[p])
		if err != nil {
			return nil, err
		}
		fi, err := os.Stat(im.files[p])
		if err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: int64(fi.Mode().Perm()), Size: int64(len(b))}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	for _, p := range slices.Sorted(maps.Keys(im.links)) {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: p, Linkname: im.links[p], Mode: 0o777}); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Import writes the image to a tarball in dir and imports it into the
// k8s.io namespace of the containerd at address.
func (im *Image) Import(address, dir string) error {
	out := path.Join(dir, strings.NewReplacer("/", "_", ":", "_").Replace(im.Tag)+".tar")
	if err := im.Write(out); err != nil {
		return fmt.Errorf("writing image %s: %w", im.Tag, err)
	}
	if b, err := exec.Command("ctr", "--address", address, "-n", "k8s.io", "images", "import", out).CombinedOutput(); err != nil {
		return fmt.Errorf("importing image %s: %v: %s", im.Tag, err, b)
	}
	return nil
}
