// Lists and downloads a model from a Hub with the official JavaScript
// client, @huggingface/hub, and prints what it got as JSON: the Go test
// beside this file runs it against pkg/source/hftest's stand-in, so that
// the stand-in answers as the real Hub does for the real client.
//
// node check.mjs <npm prefix holding @huggingface/hub> <hub URL> <repo> <revision> [token]
import { createRequire } from "node:module";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import path from "node:path";

const [npmDir, hubUrl, name, revision, accessToken] = process.argv.slice(2);
const hub = createRequire(path.join(npmDir, "package.json"))("@huggingface/hub");
const repo = { type: "model", name };
const creds = accessToken ? { accessToken } : {};

const info = await hub.modelInfo({ name, hubUrl, revision, additionalFields: ["sha"], ...creds });
const files = [];
for await (const f of hub.listFiles({ repo, recursive: true, revision, hubUrl, ...creds })) {
	if (f.type !== "file") continue;
	const dl = await hub.fileDownloadInfo({ repo, path: f.path, revision: info.sha, hubUrl, ...creds });
	const blob = await hub.downloadFile({ repo, path: f.path, revision: info.sha, hubUrl, ...creds });
	const bytes = Buffer.from(await blob.arrayBuffer());
	files.push({
		path: f.path,
		size: f.size,
		oid: f.oid,
		lfsOid: f.lfs?.oid ?? "",
		lfsSize: f.lfs?.size ?? -1,
		infoSize: dl.size,
		infoEtag: dl.etag,
		downloaded: bytes.length,
		sha256: createHash("sha256").update(bytes).digest("hex"),
	});
}
const { version } = JSON.parse(readFileSync(path.join(npmDir, "node_modules/@huggingface/hub/package.json"), "utf8"));
console.log(JSON.stringify({ version, sha: info.sha, files }));
