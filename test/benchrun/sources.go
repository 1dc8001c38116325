package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/modelcache/modelcache/pkg/source/hftest"
	"github.com/modelcache/modelcache/pkg/source/ocitest"
	"github.com/modelcache/modelcache/test/testenv"
)

// Section 9 (issue 22): the hf:// and oci:// sources against the official
// client of each, through a remote like section 7's, and a fine-tune
// published next to its cached base model.

// Goal limits of section 9.
const (
	goalSourceRatio = 0.6     // cold publish / the official client, the one-file model
	goalFineTune    = 1 << 20 // bytes the source serves for a fine-tune of a cached base
)

// Credentials of the stand-ins (made up for the run).
const (
	benchHFToken  = "hf_BenchrunToken0123456789abcdefghij"
	benchOCIUser  = "bench"
	benchOCIToken = "bench-pull-password"
)

// SourceRow is one model of section 9's side-by-side.
type SourceRow struct {
	Scheme string // "hf://" or "oci://"
	Model  model
	Client durations // (a) the official client into an empty directory (none: not run)
	Cache  durations // (b) a cold publish
	Ratios numbers   // b/a of each run
	Goal   float64   // most b/a of the medians; 0: reported only
}

// FineTuneResult is one source's fine-tune: a driver holding the base
// model publishes a model that shares all its files but one 4 KiB file.
type FineTuneResult struct {
	Scheme      string
	Base, Model model
	Took        durations // the fine-tune's publish
	Bytes       numbers   // bytes of every answer's body the source sent for it
	Requests    numbers   // requests the source answered for it
}

// SourcesResult is section 9.
type SourcesResult struct {
	Options   remoteOptions // section 7's remote, which this section plays too
	HubClient string        // the JavaScript client and Node.js versions
	Oras      string        // the oras CLI's version; "" when not run
	Rows      []SourceRow
	FineTunes []FineTuneResult
}

// officialClient is a client program that downloads a whole model into a
// directory, as an init container would.
type officialClient struct {
	warm func()                                          // pages its program in after the page cache is dropped
	cmd  func(ctx context.Context, dst string) *exec.Cmd // the download into dst
}

// site is a source's remote: the proxies in front of its servers.
type site []*testenv.Proxy

func (s site) reset() {
	for _, p := range s {
		p.Reset()
	}
}

// served sums the body bytes and the requests (GETs and HEADs) the
// proxies answered since the last reset.
func (s site) served() (n, requests int64) {
	for _, p := range s {
		n += p.ObjectBytes()
		requests += p.ObjectGets() + p.ObjectHeads()
	}
	return n, requests
}

// sources runs section 9: each source's stand-in behind throttling
// proxies, its models timed against its official client, then its
// fine-tune. The Hub is stopped before the registry starts, so only one
// holds its models in memory at a time.
func (b *bench) sources(ctx context.Context, rep *Report) error {
	res := SourcesResult{Options: b.o.Remote}
	var err error
	if res.HubClient, err = hubClientVersion(b.o.NpmDir); err != nil {
		return err
	}
	if b.o.Oras != "" {
		out, err := exec.Command(b.o.Oras, "version").Output()
		if err != nil {
			return fmt.Errorf("running %s version: %w", b.o.Oras, err)
		}
		res.Oras = strings.TrimSpace(strings.TrimPrefix(strings.SplitN(string(out), "\n", 2)[0], "Version:"))
	}
	if err := b.sourcesHF(ctx, &res); err != nil {
		return fmt.Errorf("hf://: %w", err)
	}
	debug.FreeOSMemory()
	if err := b.sourcesOCI(ctx, &res); err != nil {
		return fmt.Errorf("oci://: %w", err)
	}
	debug.FreeOSMemory()
	rep.Sources = res
	return nil
}

// throttledProxy is section 7's remote in front of any server: every
// answer's first byte held, every answer stream capped, every body counted.
func (b *bench) throttledProxy(target string) (*testenv.Proxy, error) {
	p, err := testenv.StartProxyWith(target, testenv.ProxyOptions{Objects: testenv.AllRequests})
	if err != nil {
		return nil, err
	}
	p.RateBytesPerSec.Store(b.o.Remote.Rate)
	p.FirstByteDelay.Store(int64(b.o.Remote.FirstByte))
	return p, nil
}

// sourceModels are the models each source holds: one large file, 8
// shards, and a fine-tune of the first that differs only in its
// config.json. files gives each model's files by path; the fine-tune's
// weights are the same bytes as the base's.
func (b *bench) sourceModels(scheme, prefix string) (file, shards, tuned model, files map[string]map[string][]byte) {
	o := b.o.Remote
	big := make([]byte, o.Size)
	b.logf("generating the %s models (%s file, 8 × %s shards)", scheme, sizeName(o.Size), sizeName(o.Size/8))
	fill(prefix+"-file", big)
	file = model{Name: sizeName(o.Size) + " file + config.json", Prefix: prefix + "-file", Size: o.Size, Bytes: o.Size + configBytes, Files: 2}
	tuned = model{Name: "fine-tune of it (another config.json)", Prefix: prefix + "-finetune", Size: o.Size, Bytes: o.Size + configBytes, Files: 2}
	shard := o.Size / 8
	shards = model{Name: "8 × " + sizeName(shard) + " shards + config.json", Prefix: prefix + "-shards", Size: shard, Bytes: 8*shard + configBytes, Files: 9}
	files = map[string]map[string][]byte{
		file.Prefix:  {"config.json": configJSON(file.Prefix, 0), "model.safetensors": big},
		tuned.Prefix: {"config.json": configJSON(tuned.Prefix, 0), "model.safetensors": big},
	}
	all := make([]byte, 8*shard)
	sh := map[string][]byte{"config.json": configJSON(shards.Prefix, 0)}
	for i := range 8 {
		name := fmt.Sprintf("model-%05d-of-00008.safetensors", i+1)
		sh[name] = all[int64(i)*shard : int64(i+1)*shard : int64(i+1)*shard]
		fill(shards.Prefix+"/"+name, sh[name])
	}
	files[shards.Prefix] = sh
	return file, shards, tuned, files
}

// sourceRow times runs pairs of the official client (when there is one)
// and a cold publish of m, alternating which goes first.
func (b *bench) sourceRow(ctx context.Context, scheme string, m model, goal float64, client *officialClient, sec map[string]string, args []string) (SourceRow, error) {
	row := SourceRow{Scheme: scheme, Model: m, Goal: goal}
	for r := range b.o.Remote.Runs {
		var a time.Duration
		var c coldPublish
		runClient := func() (err error) {
			if client != nil {
				a, err = b.timeClient(ctx, client, m, r)
			}
			return err
		}
		runCache := func() (err error) {
			c, err = b.coldWith(ctx, m, sec, args, r)
			return err
		}
		first, second := runClient, runCache
		if r%2 == 1 {
			first, second = runCache, runClient
		}
		if err := first(); err != nil {
			return row, err
		}
		if err := second(); err != nil {
			return row, err
		}
		row.Cache = append(row.Cache, c.took)
		if client == nil {
			b.logf("%s %s run %d: cold publish %s (no client run)", scheme, m.Name, r+1, fmtDur(c.took))
			continue
		}
		row.Client = append(row.Client, a)
		row.Ratios = append(row.Ratios, float64(c.took)/float64(a))
		b.logf("%s %s run %d: official client %s, cold publish %s (b/a %.3f)", scheme, m.Name, r+1, fmtDur(a), fmtDur(c.took), row.Ratios[r])
	}
	return row, nil
}

// timeClient runs the client into an empty directory after dropping the
// page cache, and checks (untimed) that the directory holds the model.
func (b *bench) timeClient(ctx context.Context, client *officialClient, m model, r int) (time.Duration, error) {
	dst := filepath.Join(b.work, "emptydir", fmt.Sprintf("client-%s-%d", m.Prefix, r))
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return 0, err
	}
	defer os.RemoveAll(dst)
	b.drop()
	client.warm()
	cmd := client.cmd(ctx, dst)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, out.String())
	}
	return took, checkModel(dst, m)
}

// fineTune is one run of a fine-tune: a new driver with an empty cache
// publishes the base model (untimed), then the fine-tune to another
// target; the bytes are what the source sent for the second publish.
func (b *bench) fineTune(ctx context.Context, res *FineTuneResult, s site, sec map[string]string, args []string, r int) error {
	d, err := b.startDriver(fmt.Sprintf("%s-%d", res.Model.Prefix, r), "", args...)
	if err != nil {
		return err
	}
	defer d.stop()
	base, tuned := d.target("pod-base"), d.target("pod-tuned")
	if _, err := d.publish(ctx, "csi-base", base, res.Base, sec); err != nil {
		return err
	}
	if err := checkModel(base, res.Base); err != nil {
		return err
	}
	b.drop()
	s.reset()
	took, err := d.publish(ctx, "csi-tuned", tuned, res.Model, sec)
	if err != nil {
		return err
	}
	n, requests := settledServed(s)
	if err := checkModel(tuned, res.Model); err != nil {
		return err
	}
	// Not a timing: the fine-tune's own config.json, not the base's.
	want := configJSON(res.Model.Prefix, 0)
	if got, err := os.ReadFile(filepath.Join(tuned, "config.json")); err != nil || !bytes.Equal(got, want) {
		return fmt.Errorf("the fine-tune's target does not hold its own config.json (%v)", err)
	}
	res.Took = append(res.Took, took)
	res.Bytes = append(res.Bytes, float64(n))
	res.Requests = append(res.Requests, float64(requests))
	b.logf("%s fine-tune run %d: publish %s, %d bytes in %d requests from the source", res.Scheme, r+1, fmtDur(took), n, requests)
	if err := d.unpublish(ctx, "csi-tuned", tuned); err != nil {
		return err
	}
	return d.unpublish(ctx, "csi-base", base)
}

// settledServed waits until the site's byte count stops moving (a body's
// last write is counted just after the client has it) and returns it.
func settledServed(s site) (n, requests int64) {
	last, _ := s.served()
	for range 50 {
		time.Sleep(20 * time.Millisecond)
		n, requests = s.served()
		if n == last {
			return n, requests
		}
		last = n
	}
	return s.served()
}

// sourcesHF is section 9 for hf://: the Hub stand-in (pkg/source/hftest)
// with its API and its CDN each behind a throttling proxy, the LFS
// redirects sent to the CDN's proxy; the client is @huggingface/hub.
func (b *bench) sourcesHF(ctx context.Context, res *SourcesResult) error {
	// LFS files: the weights (by their extension) and, as the Hub has
	// it, any file over 10 MB; config.json is a plain git file.
	hub := hftest.Start(hftest.Options{LFSAbove: 10_000_000})
	defer hub.Close()
	api, err := b.throttledProxy(hub.URL)
	if err != nil {
		return err
	}
	defer api.Stop()
	cdn, err := b.throttledProxy(hub.CDNURL)
	if err != nil {
		return err
	}
	defer cdn.Stop()
	hub.RedirectLFSTo(cdn.URL)
	hub.AddToken(benchHFToken)

	file, shards, tuned, files := b.sourceModels("hf://", "hf")
	for _, m := range []*model{&file, &shards, &tuned} {
		repo := "bench/" + m.Prefix
		// Private: every request carries the token, as a gated or
		// private model's do.
		hub.CreateRepo(repo, hftest.Repo{Private: true, Access: []string{benchHFToken}})
		hub.Commit(repo, "main", files[m.Prefix])
		m.Source = "hf://" + repo
	}
	files = nil
	sec := map[string]string{"HF_ENDPOINT": api.URL, "HF_TOKEN": benchHFToken}
	for _, x := range []struct {
		m    model
		goal float64
	}{{file, goalSourceRatio}, {shards, 0}} {
		row, err := b.sourceRow(ctx, "hf://", x.m, x.goal, b.hubClient(api.URL, "bench/"+x.m.Prefix), sec, nil)
		if err != nil {
			return err
		}
		res.Rows = append(res.Rows, row)
	}
	ft := FineTuneResult{Scheme: "hf://", Base: file, Model: tuned}
	for r := range b.o.Remote.Runs {
		if err := b.fineTune(ctx, &ft, site{api, cdn}, sec, nil, r); err != nil {
			return err
		}
	}
	res.FineTunes = append(res.FineTunes, ft)
	return nil
}

// hubClient is test/hfclient/download.mjs: @huggingface/hub's modelInfo,
// listFiles and downloadFile, each file streamed into dst.
func (b *bench) hubClient(endpoint, repo string) *officialClient {
	script := filepath.Join(testenv.RepoRoot(), "test", "hfclient", "download.mjs")
	return &officialClient{
		warm: func() {
			// Node and the client's modules read once, as the driver's
			// running binary is in memory.
			_ = exec.Command("node", "-e", "require(process.argv[1])", filepath.Join(b.o.NpmDir, "node_modules", "@huggingface", "hub")).Run()
		},
		cmd: func(ctx context.Context, dst string) *exec.Cmd {
			cmd := exec.CommandContext(ctx, "node", script, b.o.NpmDir, endpoint, repo, "main", dst)
			cmd.Env = append(cleanEnv("HF_"), "HF_TOKEN="+benchHFToken)
			return cmd
		},
	}
}

// cleanEnv is this process's environment without the variables that
// start with any of prefixes.
func cleanEnv(prefixes ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		keep := true
		for _, p := range prefixes {
			keep = keep && !strings.HasPrefix(kv, p)
		}
		if keep {
			env = append(env, kv)
		}
	}
	return env
}

// hubClientVersion is the installed @huggingface/hub's version and Node's.
func hubClientVersion(npmDir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(npmDir, "node_modules", "@huggingface", "hub", "package.json"))
	if err != nil {
		return "", fmt.Errorf("@huggingface/hub is not installed in %s (make hfhub installs it): %w", npmDir, err)
	}
	var pkg struct{ Version string }
	if err := json.Unmarshal(b, &pkg); err != nil {
		return "", fmt.Errorf("reading @huggingface/hub's package.json: %w", err)
	}
	node, err := exec.Command("node", "--version").Output()
	if err != nil {
		return "", fmt.Errorf("running node --version (the Hub client runs on Node.js): %w", err)
	}
	return fmt.Sprintf("@huggingface/hub %s on Node.js %s", pkg.Version, strings.TrimSpace(string(node))), nil
}

// sourcesOCI is section 9 for oci://: the registry stand-in
// (pkg/source/ocitest, token authentication) behind a throttling proxy,
// its token service reached through it too; the client is oras pull.
func (b *bench) sourcesOCI(ctx context.Context, res *SourcesResult) error {
	reg := ocitest.Start(ocitest.Options{Users: map[string]string{benchOCIUser: benchOCIToken}})
	defer reg.Close()
	p, err := b.throttledProxy("http://" + reg.Host)
	if err != nil {
		return err
	}
	defer p.Stop()
	host := strings.TrimPrefix(p.URL, "http://")

	file, shards, tuned, files := b.sourceModels("oci://", "oci")
	for _, m := range []*model{&file, &shards, &tuned} {
		b.logf("pushing %s to the registry with oras-go", m.Prefix)
		if err := pushModelPack(ctx, reg.Host, "bench/"+m.Prefix, "v1", files[m.Prefix]); err != nil {
			return err
		}
		m.Source = "oci://" + host + "/bench/" + m.Prefix + ":v1"
	}
	files = nil
	debug.FreeOSMemory() // the registry holds the models now

	auths := dockerConfig(host)
	sec := map[string]string{".dockerconfigjson": auths}
	args := []string{"--plain-http-registry=" + host}
	conf := filepath.Join(b.work, "oras-registry-config.json")
	if err := os.WriteFile(conf, []byte(auths), 0o600); err != nil {
		return err
	}
	for _, x := range []struct {
		m    model
		goal float64
	}{{file, goalSourceRatio}, {shards, 0}} {
		row, err := b.sourceRow(ctx, "oci://", x.m, x.goal, b.orasClient(conf, strings.TrimPrefix(x.m.Source, "oci://")), sec, args)
		if err != nil {
			return err
		}
		res.Rows = append(res.Rows, row)
	}
	ft := FineTuneResult{Scheme: "oci://", Base: file, Model: tuned}
	for r := range b.o.Remote.Runs {
		if err := b.fineTune(ctx, &ft, site{p}, sec, args, r); err != nil {
			return err
		}
	}
	res.FineTunes = append(res.FineTunes, ft)
	return nil
}

// orasClient is `oras pull` of ref into dst, with the registry's
// credentials in a Docker config file of their own; nil when no oras CLI
// was given.
func (b *bench) orasClient(conf, ref string) *officialClient {
	if b.o.Oras == "" {
		return nil
	}
	return &officialClient{
		warm: func() { _ = exec.Command(b.o.Oras, "version").Run() },
		cmd: func(ctx context.Context, dst string) *exec.Cmd {
			cmd := exec.CommandContext(ctx, b.o.Oras, "pull", "--plain-http", "--no-tty", "--registry-config", conf, "-o", dst, ref)
			cmd.Env = cleanEnv("ORAS_", "DOCKER_")
			return cmd
		},
	}
}

// dockerConfig is a .dockerconfigjson with the pull account for host.
func dockerConfig(host string) string {
	cred := base64.StdEncoding.EncodeToString([]byte(benchOCIUser + ":" + benchOCIToken))
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{host: map[string]string{"auth": cred}}})
	return string(b)
}
