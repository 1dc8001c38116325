// Downloads every file of a model at a revision into a directory with the
// official JavaScript client, @huggingface/hub, as its snapshotDownload
// does (the revision pinned to its commit by modelInfo, the files listed
// by listFiles and fetched one after another by downloadFile, each
// streamed to disk), but into <dir>/<path> rather than the Hub cache's
// blobs and symlinks. test/benchrun times it against a cold publish.
// The token, if any, comes from HF_TOKEN, never from the command line.
//
// node download.mjs <npm prefix holding @huggingface/hub> <hub URL> <repo> <revision> <dir>
import { createRequire } from "node:module";
import { createWriteStream } from "node:fs";
import { mkdir } from "node:fs/promises";
import path from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";

const [npmDir, hubUrl, name, revision, dir] = process.argv.slice(2);
if (!dir) {
	console.error("usage: node download.mjs <npm prefix> <hub URL> <repo> <revision> <dir>");
	process.exit(2);
}
const hub = createRequire(path.join(path.resolve(npmDir), "package.json"))("@huggingface/hub");
const repo = { type: "model", name };
const creds = process.env.HF_TOKEN ? { accessToken: process.env.HF_TOKEN } : {};

const { sha } = await hub.modelInfo({ name, hubUrl, revision, additionalFields: ["sha"], ...creds });
let files = 0;
for await (const f of hub.listFiles({ repo, recursive: true, revision: sha, hubUrl, ...creds })) {
	if (f.type !== "file") continue;
	const blob = await hub.downloadFile({ repo, path: f.path, revision: sha, hubUrl, ...creds });
	if (!blob) throw new Error(`${f.path} is listed but not found`);
	const to = path.join(dir, f.path);
	if (path.relative(dir, to).startsWith("..")) throw new Error(`${f.path} is outside the model`);
	await mkdir(path.dirname(to), { recursive: true });
	await pipeline(Readable.fromWeb(blob.stream()), createWriteStream(to));
	files++;
}
console.log(JSON.stringify({ sha, files }));
