package main

import "fmt"

// clientName is how the tables name a scheme's official client.
func clientName(scheme string) string {
	if scheme == "oci://" {
		return "oras pull"
	}
	return "@huggingface/hub download"
}

func (r *Report) sourcesSection(w writer) {
	x := r.Sources
	o := x.Options
	oras := "oras " + x.Oras
	if x.Oras == "" {
		oras = "not run in this run (no oras CLI given)"
	}
	w("\n## 9. The hf:// and oci:// sources\n\n")
	w("A cold publish of an `hf://` model and of an `oci://` ModelPack model against the official client of each, and a fine-tune published beside its cached base model, through section 7's remote: a proxy in front of each server that caps each response stream at %s and holds each response's first byte %s. Here that is every response, not only object bodies: the Hub's API answers and redirects, the registry's manifests and its token service's answers too. %s of each; the driver is %s.\n\n",
		rateName(o.Rate), durName(o.FirstByte), plural(o.Runs, "run"), r.Machine.Driver)
	w("### Cold publish vs the official clients\n\n")
	w("(a) `hf://`: `node test/hfclient/download.mjs` with %s: `modelInfo` pins `main` to its commit, `listFiles` lists it and `downloadFile` fetches each file in turn, streamed into `<dir>/<path>` (what its `snapshotDownload` does, without the Hub cache's blobs and symlinks). `oci://`: `oras pull` (%s) into an empty directory. (b) NodePublishVolume of the same model by a new driver with an empty cache. Every model also holds a 4 KiB `config.json`.\n\n",
		x.HubClient, oras)
	w("| source | model | (a) official client | (b) cold publish | b/a (of medians) | b/a per run |\n|---|---|---|---|---|---|\n")
	for _, row := range x.Rows {
		if len(row.Client) == 0 {
			w("| `%s` | %s | not run | %s | — | — |\n", row.Scheme, row.Model.Name, fmtDurs(row.Cache))
			continue
		}
		w("| `%s` | %s | %s: %s | %s | **%.3f** | %s |\n", row.Scheme, row.Model.Name, clientName(row.Scheme), fmtDurs(row.Client), fmtDurs(row.Cache),
			ratio(row.Cache, row.Client), fmtNums(row.Ratios, ""))
	}
	w("\n### A fine-tune of a cached model\n\n")
	w("A new driver publishes the %s model (untimed), then its fine-tune to another target: another repository holding the same `model.safetensors` and a `config.json` of its own, 4 KiB. The bytes are every response body the source's servers sent for the fine-tune's publish (the Hub's API and CDN, or the registry and its token service): revision, listing and manifest, the new `config.json`, and what the driver asked to check that the request may read the weights it already holds.\n\n",
		sizeName(o.Size))
	w("| source | the fine-tune's publish | bytes the source sent for it | requests it answered |\n|---|---|---|---|\n")
	for _, ft := range x.FineTunes {
		w("| `%s` | %s | %s | %s |\n", ft.Scheme, fmtDurs(ft.Took), fmtSizes(ft.Bytes), fmtCounts(ft.Requests))
	}
	w("\n### How it was measured\n\n")
	for _, n := range r.sourcesMethod() {
		w("- %s\n", n)
	}
}

func (r *Report) sourcesMethod() []string {
	drop := "The page cache is not dropped in this run (see the drop note under Method)."
	if r.Machine.DropCaches {
		drop = "The page cache is dropped before each download and each publish, as in section 1."
	}
	return []string{
		"`hf://`: `pkg/source/hftest`, the Hub stand-in that `test/hfclient` holds to what the official client expects: its API on one server, LFS files (the `.safetensors`; `config.json` is a plain git file) answered with a 302 to a signed URL on a CDN server; a proxy (`testenv.StartProxyWith`) in front of each, the Hub's redirects naming the CDN's proxy. The models are private: both sides send the token (`HF_TOKEN`; the driver's secret also names the API's proxy as `HF_ENDPOINT`, the client gets it as `hubUrl`).",
		"`oci://`: `pkg/source/ocitest`, go-containerregistry's registry behind Docker's token authentication, with a proxy in front that also names itself as the token service. The models are pushed with oras-go (untimed) as ModelPack manifests with one raw layer per file, each layer naming its file in model-spec's `org.cncf.model.filepath` and in OCI's `org.opencontainers.image.title`, which `oras pull` names the files it writes by. Both sides read with the same account: the driver from a `.dockerconfigjson` secret, started with `--plain-http-registry` for the proxy's address; `oras pull --plain-http --registry-config` from a file holding the same JSON.",
		"Both stand-ins serve from memory, so no disk limits either side. The proxies run in the benchmark's own process, on the same cores as the side measured, and read each answer ahead into memory as section 7's does.",
		"Each side with its defaults: @huggingface/hub's `downloadFile` fetches a file in one stream, and `download.mjs` one file after another, as `snapshotDownload` does; `oras pull` fetches 3 blobs at a time (`--concurrency 3`), each in one stream; the driver as in section 1 (`--transfers=16`, ranged chunks for files of 256 MiB or more where the source serves ranges).",
		"(a) is timed from the client process's start to its exit: Node's start-up and the loading of the client's modules count, after an untimed run that read them into memory (as the driver's running binary is); for oras an untimed `oras version` does the same. (b) is the NodePublishVolume call. Runs alternate which side goes first. " + drop,
		"Every download and publish is checked afterwards (untimed) to hold the model's files and bytes; the fine-tune's target to hold its own `config.json`. Bytes are counted by the proxies as they write each response body; the count is read once it stops moving.",
	}
}

// sourcesGoals are section 9's goals.
func (r *Report) sourcesGoals() []Goal {
	x := r.Sources
	var gs []Goal
	for _, row := range x.Rows {
		if row.Goal == 0 {
			continue
		}
		g := Goal{Section: "9", Goal: fmt.Sprintf("`%s`, %s: cold publish / %s ≤ %.2f", row.Scheme, row.Model.Name, clientName(row.Scheme), row.Goal)}
		if len(row.Client) == 0 {
			g.Measured, g.Met = clientName(row.Scheme)+" not run", "not run"
		} else {
			q := ratio(row.Cache, row.Client)
			g.Measured, g.Met = fmt.Sprintf("%.3f", q), metStr(len(row.Cache) > 0 && q <= row.Goal)
		}
		gs = append(gs, g)
	}
	for _, ft := range x.FineTunes {
		m := "—"
		if w, ok := worstRun(ft.Bytes); ok {
			m = fmt.Sprintf("%s in %s", fmtSizes(numbers{ft.Bytes[w]}), plural(int(ft.Requests[w]), "request"))
		}
		gs = append(gs, Goal{"9", fmt.Sprintf("`%s`: a fine-tune sharing all but one 4 KiB file with a cached base model fetches < %s (worst run)", ft.Scheme, sizeName(goalFineTune)),
			m, metStr(len(ft.Bytes) > 0 && ft.Bytes.Max() < goalFineTune)})
	}
	return gs
}
