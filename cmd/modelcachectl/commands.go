package main

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/modelcache/modelcache/pkg/adminapi"
	"github.com/modelcache/modelcache/pkg/units"
)

var cmdLs = &command{
	name:     "ls",
	synopsis: "ls [--output table|json]",
	summary:  "list the models cached on this node",
	help: `
List the models cached on this node, least recently used first: the tree
digest (its first 12 hex digits, accepted wherever a tree is named), size,
number of files, where its bytes came from (FROM: the origin, peers, or
each one's share of the bytes read; "-" when nothing was recorded, as for
a tree cached by an older driver or linked entirely from earlier
downloads), the model URIs it was fetched as, the pods using it
(volume IDs when the pod is unknown), when it was last used and whether it
is pinned. DOOMED marks a tree that is removed when its last mount goes;
MISSING a recorded tree whose directory is gone from the store.`,
	run: (*app).ls,
}

func (a *app) ls(cmd *command, args []string) error {
	output, _, err := a.parseListing(cmd, args, 0)
	if err != nil {
		return err
	}
	if output == "json" {
		return a.printJSON("/v1/trees", nil)
	}
	trees, err := a.client().Trees(a.ctx)
	if err != nil {
		return err
	}
	if len(trees) == 0 {
		fmt.Fprintln(a.stdout, "no models cached on this node")
		return nil
	}
	t := newTable(a.stdout)
	fmt.Fprintln(t, "DIGEST\tSIZE\tFILES\tFROM\tURIS\tUSED BY\tLAST USE\tPINNED\t")
	for _, tr := range trees {
		pinned := ""
		if tr.Pinned {
			pinned = "yes"
		}
		var marks []string
		if tr.Doomed != "" {
			marks = append(marks, fmt.Sprintf("DOOMED (%s)", tr.Doomed))
		}
		if !tr.Present {
			marks = append(marks, "MISSING")
		}
		fmt.Fprintf(t, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", shortDigest(tr.Digest), units.Bytes(tr.Size), tr.Files, fromShare(tr.From),
			orDash(quoteNames(tr.URIs), ",")+atRevisions(tr.Revisions), orDash(usersOf(tr.Refs), ","), relTime(tr.LastUsed, a.now()), pinned, strings.Join(marks, " "))
	}
	return t.Flush()
}

var cmdInspect = &command{
	name:     "inspect",
	synopsis: "inspect DIGEST|URI [--output table|json]",
	summary:  "show one cached model and its files",
	help: `
Show one cached model: its digest, the URIs it was fetched as, size, files,
how many bytes its downloads read from the origin and from which peers,
pin, last use and the pods using it, then every file with its size and
sha256. Name the model by digest (sha256:..., or at least its first 12 hex
digits) or by a model URI it was fetched as.`,
	run: (*app).inspect,
}

func (a *app) inspect(cmd *command, args []string) error {
	output, pos, err := a.parseListing(cmd, args, 1)
	if err != nil {
		return err
	}
	if output == "json" {
		return a.printJSON("/v1/tree", url.Values{"ref": {pos[0]}})
	}
	in, err := a.client().Tree(a.ctx, pos[0])
	if err != nil {
		return err
	}
	pinned := "no"
	if in.Pinned {
		pinned = "yes"
		if !in.PinnedAt.IsZero() {
			pinned += " (since " + relTime(in.PinnedAt, a.now()) + ")"
		}
	}
	t := newTable(a.stdout)
	fmt.Fprintf(t, "digest:\t%s\n", in.Digest)
	fmt.Fprintf(t, "uris:\t%s\n", orDash(quoteNames(in.URIs), ", "))
	if len(in.Revisions) > 0 {
		fmt.Fprintf(t, "revisions:\t%s\n", strings.Join(quoteNames(in.Revisions), ", "))
	}
	fmt.Fprintf(t, "size:\t%s\n", units.Bytes(in.Size))
	fmt.Fprintf(t, "files:\t%d\n", in.Files)
	fmt.Fprintf(t, "from:\t%s\n", fromDetail(in.From))
	fmt.Fprintf(t, "pinned:\t%s\n", pinned)
	fmt.Fprintf(t, "last use:\t%s\n", relTime(in.LastUsed, a.now()))
	fmt.Fprintf(t, "used by:\t%s\n", orDash(usersOf(in.Refs), ", "))
	if in.Doomed != "" {
		fmt.Fprintf(t, "doomed:\t%s: removed when its last mount goes\n", in.Doomed)
	}
	if !in.Present {
		fmt.Fprintf(t, "present:\tno: the tree directory is missing from the store\n")
	}
	if err := t.Flush(); err != nil {
		return err
	}
	if len(in.Contents) == 0 {
		return nil
	}
	fmt.Fprintln(a.stdout)
	t = newTable(a.stdout)
	fmt.Fprintln(t, "PATH\tSIZE\tSHA256")
	for _, f := range in.Contents {
		sum := f.Sha256
		if sum == "" {
			sum = "-"
		}
		fmt.Fprintf(t, "%s\t%s\t%s\n", quoteName(f.Path), units.Bytes(f.Size), sum)
	}
	return t.Flush()
}

var cmdPrefetch = &command{
	name:     "prefetch",
	synopsis: "prefetch URI [--secret-file FILE]",
	summary:  "download a model into the cache before pods need it",
	help: `
Download a model into this node's cache (warm it) before a rollout, and
wait for it, showing progress. URI takes the forms of the modelUri volume
attribute (remote:path, s3://, gs://, https://). If the model is already
cached nothing is downloaded.

--secret-file holds the credentials pods pass as their node-publish secret:
either a Kubernetes Secret manifest in YAML or JSON (data in base64 and/or
stringData), e.g. from 'kubectl get secret seldon-rclone-secret -o yaml', or
an env file of KEY=VALUE lines (# comments and blank lines are ignored,
values may be quoted). "-" reads it from stdin. The values are sent only to
the node plugin and never printed.

Interrupting modelcachectl stops waiting; run the same prefetch again to
follow the download.`,
	run: (*app).prefetch,
}

func (a *app) prefetch(cmd *command, args []string) error {
	fs := a.flagSet(cmd)
	secretFile := fs.String("secret-file", "", "credentials: a Kubernetes Secret manifest or an env `FILE` of KEY=VALUE lines")
	pos, err := a.parse(cmd, fs, args, 1, 1)
	if err != nil {
		return err
	}
	uri := pos[0]
	secrets := map[string]string{}
	if *secretFile != "" {
		if secrets, err = readSecretFile(*secretFile, a.stdin); err != nil {
			return err
		}
	}
	p := &progress{w: a.stdout, uri: uri, tty: a.isTTY(), width: a.termWidth, now: a.now, interval: a.progressEvery}
	ev, err := a.client().Prefetch(a.ctx, adminapi.PrefetchRequest{URI: uri, Secrets: secrets}, func(ev adminapi.PrefetchEvent) {
		p.update(ev.Done, ev.Total)
	})
	p.clear()
	switch {
	case err == nil:
	case a.ctx.Err() != nil:
		return fmt.Errorf("interrupted: stopped waiting for %s; the download may go on on the node: run the same prefetch again to follow it", uri)
	case errors.Is(err, adminapi.ErrIncomplete):
		return fmt.Errorf("the node plugin closed the connection before %s was cached; run the same prefetch again to follow it", uri)
	default:
		return err
	}
	size := units.Bytes(max(ev.Total, ev.Done))
	at := ""
	if ev.Revision != "" {
		at = " at " + quoteName(ev.Revision)
	}
	if !ev.Fetched {
		fmt.Fprintf(a.stdout, "already cached%s as %s (%s, %s)\n", at, ev.Tree, plural(ev.Files, "file"), size)
		return nil
	}
	fmt.Fprintf(a.stdout, "cached %s%s as %s (%s, %s) in %s\n", uri, at, ev.Tree, plural(ev.Files, "file"), size, formatTook(ev.Took))
	return nil
}

var cmdPin = &command{
	name:     "pin",
	synopsis: "pin DIGEST|URI",
	summary:  "keep a cached model from being evicted to make room",
	help: `
Pin a cached model: garbage collection never evicts it to make room, even
when no pod uses it. An explicit evict or a drain still removes it.`,
	run: func(a *app, cmd *command, args []string) error { return a.pin(cmd, args, true) },
}

var cmdUnpin = &command{
	name:     "unpin",
	synopsis: "unpin DIGEST|URI",
	summary:  "let a pinned model be evicted again",
	help: `
Unpin a cached model: once no pod uses it, garbage collection may evict it
to make room, least recently used first.`,
	run: func(a *app, cmd *command, args []string) error { return a.pin(cmd, args, false) },
}

func (a *app) pin(cmd *command, args []string, on bool) error {
	fs := a.flagSet(cmd)
	pos, err := a.parse(cmd, fs, args, 1, 1)
	if err != nil {
		return err
	}
	pin, verb := a.client().Unpin, "unpinned"
	if on {
		pin, verb = a.client().Pin, "pinned"
	}
	t, err := pin(a.ctx, pos[0])
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "%s %s (%s, %s)\n", verb, t.Digest, orDash(quoteNames(t.URIs), ", "), units.Bytes(t.Size))
	return nil
}

var cmdEvict = &command{
	name:     "evict",
	synopsis: "evict DIGEST|URI [--when-unused]",
	summary:  "remove a cached model from this node",
	help: `
Remove a cached model from this node, pinned or not, and free the blobs no
other model shares. A model that pods mount is never removed under them:
evict fails, unless --when-unused marks it to be removed when its last
mount goes.`,
	run: (*app).evict,
}

func (a *app) evict(cmd *command, args []string) error {
	fs := a.flagSet(cmd)
	whenUnused := fs.Bool("when-unused", false, "if pods mount the model, remove it when its last mount goes instead of failing")
	pos, err := a.parse(cmd, fs, args, 1, 1)
	if err != nil {
		return err
	}
	res, err := a.client().Evict(a.ctx, pos[0], *whenUnused)
	if err != nil {
		return err
	}
	if res.Pending {
		fmt.Fprintf(a.stdout, "%s is in use; it will be removed when its last mount goes\n", res.Tree)
		return nil
	}
	fmt.Fprintf(a.stdout, "evicted %s (freed %s)\n", res.Tree, units.Bytes(res.Freed))
	return nil
}

var cmdGC = &command{
	name:     "gc",
	synopsis: "gc [--dry-run]",
	summary:  "evict unused models until the cache fits its budget",
	help: `
Enforce the cache budget now: evict models no pod uses and nobody pinned,
least recently used first, until the cache fits. When it cannot fit without
touching models in use or pinned, gc says so (on stderr) and still exits 0.`,
	run: (*app).gc,
}

func (a *app) gc(cmd *command, args []string) error {
	fs := a.flagSet(cmd)
	dryRun := fs.Bool("dry-run", false, "print what would be evicted; remove nothing")
	if _, err := a.parse(cmd, fs, args, 0, 0); err != nil {
		return err
	}
	res, err := a.client().GC(a.ctx, *dryRun)
	if err != nil {
		return err
	}
	verb, total := "evicted", "freed"
	if res.DryRun {
		verb, total = "would evict", "would free"
	}
	for _, c := range res.Evicted {
		fmt.Fprintf(a.stdout, "%s %s (%s)\n", verb, c.Digest, units.Bytes(c.Size))
	}
	if len(res.Evicted) == 0 {
		fmt.Fprintln(a.stdout, "nothing to evict")
	} else {
		fmt.Fprintf(a.stdout, "%s %s from %s\n", total, units.Bytes(res.Freed), plural(len(res.Evicted), "model"))
	}
	if res.Warning != "" {
		fmt.Fprintf(a.stderr, "warning: %s\n", escapeInvisible(res.Warning))
	} else if res.Over > 0 {
		fmt.Fprintf(a.stderr, "warning: the cache is still %s over its budget\n", units.Bytes(res.Over))
	}
	return nil
}

var cmdDrain = &command{
	name:     "drain",
	synopsis: "drain",
	summary:  "empty this node's cache and start no new downloads",
	help: `
Drain this node's cache: remove every model no pod uses (pinned ones too),
mark the ones in use to be removed when their last mount goes, and start no
new downloads until undrain. Pods keep their mounts. Running it again is
harmless.`,
	run: (*app).drain,
}

func (a *app) drain(cmd *command, args []string) error {
	fs := a.flagSet(cmd)
	if _, err := a.parse(cmd, fs, args, 0, 0); err != nil {
		return err
	}
	res, err := a.client().Drain(a.ctx)
	if err != nil {
		return err
	}
	for _, d := range res.Removed {
		fmt.Fprintf(a.stdout, "removed %s\n", d)
	}
	for _, d := range res.Pending {
		fmt.Fprintf(a.stdout, "pending %s: in use; removed when its last mount goes\n", d)
	}
	fmt.Fprintf(a.stdout, "node drained: removed %s (freed %s), %d pending; no downloads start until 'modelcachectl undrain'\n",
		plural(len(res.Removed), "model"), units.Bytes(res.Freed), len(res.Pending))
	return nil
}

var cmdUndrain = &command{
	name:     "undrain",
	synopsis: "undrain",
	summary:  "let this node download models again",
	help: `
Undrain this node: publishes and prefetches download models again. Models
already marked for removal by drain are still removed when their last mount
goes. Running it again is harmless.`,
	run: (*app).undrain,
}

func (a *app) undrain(cmd *command, args []string) error {
	fs := a.flagSet(cmd)
	if _, err := a.parse(cmd, fs, args, 0, 0); err != nil {
		return err
	}
	if _, err := a.client().Undrain(a.ctx); err != nil {
		return err
	}
	fmt.Fprintln(a.stdout, "node undrained: models are downloaded again")
	return nil
}

var cmdVerify = &command{
	name:     "verify",
	synopsis: "verify",
	summary:  "re-hash every cached file and quarantine corrupt ones",
	help: `
Re-hash every blob in the cache. A blob whose content no longer matches its
digest is quarantined; the models linking it are removed when no pod uses
them, or stop being served to new pods (running pods keep their mount) and
are repaired by their next download. Exits 1 when anything was corrupt.
This reads the whole cache and may take a while.`,
	run: (*app).verify,
}

func (a *app) verify(cmd *command, args []string) error {
	fs := a.flagSet(cmd)
	if _, err := a.parse(cmd, fs, args, 0, 0); err != nil {
		return err
	}
	rep, err := a.client().Verify(a.ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "checked %s (%s) in %s\n", plural(rep.Blobs, "blob"), units.Bytes(rep.Bytes), formatTook(rep.Took))
	for i, b := range rep.Corrupt {
		if i < len(rep.Quarantined) {
			fmt.Fprintf(a.stdout, "corrupt blob %s: quarantined as %s\n", b, rep.Quarantined[i])
		} else {
			fmt.Fprintf(a.stdout, "corrupt blob %s: quarantined\n", b)
		}
	}
	for _, d := range rep.Removed {
		fmt.Fprintf(a.stdout, "removed damaged model %s (no pod used it)\n", d)
	}
	for _, d := range rep.Invalidated {
		fmt.Fprintf(a.stdout, "invalidated damaged model %s: pods using it keep their mount; its next download repairs it\n", d)
	}
	if !rep.OK {
		return fmt.Errorf("found %s; damaged models are downloaded again on their next publish or prefetch", plural(max(len(rep.Corrupt), 1), "corrupt blob"))
	}
	fmt.Fprintln(a.stdout, "no corruption found")
	return nil
}

var cmdDu = &command{
	name:     "du",
	synopsis: "du [--output table|json]",
	summary:  "show the cache's disk usage",
	help: `
Show what the cache holds: bytes and count of blobs (stored once each),
bytes the models present to pods (shared files counted per model), what
deduplication saves, downloads in progress, quarantined blobs, the cache
filesystem's size and free space, and whether the node is drained.`,
	run: (*app).du,
}

func (a *app) du(cmd *command, args []string) error {
	output, _, err := a.parseListing(cmd, args, 0)
	if err != nil {
		return err
	}
	if output == "json" {
		return a.printJSON("/v1/du", nil)
	}
	u, err := a.client().DU(a.ctx)
	if err != nil {
		return err
	}
	t := newTable(a.stdout)
	fmt.Fprintf(t, "blobs\t%s\t(%s)\n", units.Bytes(u.BlobBytes), plural(u.Blobs, "blob"))
	fmt.Fprintf(t, "models\t%s\t(%s, as presented to pods)\n", units.Bytes(u.TreeBytes), plural(u.Trees, "model"))
	fmt.Fprintf(t, "saved by dedup\t%s\t\n", units.Bytes(u.SavedBytes))
	fmt.Fprintf(t, "downloading\t%s\t\n", units.Bytes(u.IngestBytes))
	fmt.Fprintf(t, "quarantined\t%s\t\n", plural(u.Quarantined, "blob"))
	fmt.Fprintf(t, "filesystem\t%s\t(%s free)\n", units.Bytes(u.FSSize), units.Bytes(u.FSFree))
	fmt.Fprintf(t, "drained\t%s\t\n", yesNo(u.Drained))
	return t.Flush()
}

// printJSON prints the reply to GET path as the node plugin sent it.
func (a *app) printJSON(path string, query url.Values) error {
	raw, err := a.client().Raw(a.ctx, path, query)
	if err != nil {
		return err
	}
	return writeJSON(a.stdout, raw)
}

// parseListing parses the flags of a command that prints a listing: its
// --output and exactly n positional arguments.
func (a *app) parseListing(cmd *command, args []string, n int) (output string, pos []string, err error) {
	fs := a.flagSet(cmd)
	out := outputFlag(fs)
	if pos, err = a.parse(cmd, fs, args, n, n); err != nil {
		return "", nil, err
	}
	if err := a.checkOutput(cmd, *out); err != nil {
		return "", nil, err
	}
	return *out, pos, nil
}

// atRevisions is the short form of the Hub commits and OCI manifest
// digests a tree's URIs resolved to, for ls: " @" and their first 12 hex
// digits.
func atRevisions(revs []string) string {
	var out []string
	for _, r := range revs {
		out = append(out, shortDigest(r))
	}
	if len(out) == 0 {
		return ""
	}
	return " @" + strings.Join(quoteNames(out), ",")
}
