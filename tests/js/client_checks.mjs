// Runs one check of the unmodified @fal-ai/client against a live kleinserve.
//
//   KLEINSERVE_URL=http://127.0.0.1:8000 FAL_KEY=... node client_checks.mjs <check>
//
// The client is pointed at kleinserve with `requestMiddleware` only (the way a user would do it):
// https://queue.fal.run/... -> $KLEINSERVE_URL/queue/..., https://fal.run/... and
// https://rest.fal.ai/... -> $KLEINSERVE_URL/... . Prints one JSON line with what was observed and
// exits non-zero (with the error on stderr) when a check fails.

import { createFalClient } from "@fal-ai/client";
import assert from "node:assert/strict";

const BASE = (process.env.KLEINSERVE_URL || "http://127.0.0.1:8000").replace(/\/$/, "");
const ENDPOINT = process.env.ENDPOINT_ID || "fal-ai/flux-2/klein/9b/base";
const INPUT = {
  prompt: "a red bicycle leaning on a wall",
  image_size: { width: 64, height: 64 },
  num_inference_steps: 4,
  seed: 42,
  enable_safety_checker: false,
};

// The mapping from fal's hosts to kleinserve (README / docs/STORAGE_WEBHOOKS.md show the same).
const HOSTS = [
  ["https://queue.fal.run/", `${BASE}/queue/`],
  ["https://fal.run/", `${BASE}/`],
  ["https://rest.fal.ai/", `${BASE}/`],
];
const seenUrls = [];
function toKleinserve(request) {
  for (const [from, to] of HOSTS) {
    if (request.url.startsWith(from)) {
      const url = to + request.url.slice(from.length);
      seenUrls.push(`${request.method} ${url}`);
      return Promise.resolve({ ...request, url });
    }
  }
  return Promise.resolve(request);
}

const fal = createFalClient({
  credentials: process.env.FAL_KEY,
  requestMiddleware: toKleinserve,
});

async function download(url) {
  const r = await fetch(url);
  assert.equal(r.status, 200, `GET ${url} -> ${r.status}`);
  return { type: r.headers.get("content-type"), bytes: new Uint8Array(await r.arrayBuffer()) };
}

function checkOutput(data) {
  assert.ok(Array.isArray(data.images) && data.images.length === 1, JSON.stringify(data));
  const img = data.images[0];
  assert.ok(img.url && img.width === 64 && img.height === 64, JSON.stringify(img));
  assert.equal(data.seed, 42);
  assert.equal(data.prompt, INPUT.prompt);
  return img;
}

const checks = {
  async subscribe() {
    const updates = [];
    const logs = [];
    let enqueued = null;
    const result = await fal.subscribe(ENDPOINT, {
      input: INPUT,
      logs: true,
      pollInterval: 100,
      onEnqueue: (id) => (enqueued = id),
      onQueueUpdate: (u) => {
        updates.push(u.status);
        if (u.logs) logs.push(...u.logs);
      },
    });
    assert.ok(enqueued, "onEnqueue was not called");
    assert.equal(result.requestId, enqueued);
    assert.equal(updates[updates.length - 1], "COMPLETED");
    assert.ok(logs.length > 0, "no logs although logs: true");
    for (const l of logs) assert.ok("message" in l && "level" in l && "timestamp" in l);
    const img = checkOutput(result.data);
    const file = await download(img.url);
    assert.ok(file.bytes.length > 0);
    assert.equal(file.type, img.content_type);
    return { requestId: result.requestId, statuses: [...new Set(updates)], logs: logs.length };
  },

  async queue() {
    const { request_id, status_url, response_url, cancel_url } = await fal.queue.submit(ENDPOINT, {
      input: INPUT,
    });
    assert.ok(request_id && status_url && response_url && cancel_url);
    const statuses = [];
    let status;
    for (let i = 0; i < 600; i++) {
      status = await fal.queue.status(ENDPOINT, { requestId: request_id, logs: true });
      statuses.push(status.status);
      if (status.status === "COMPLETED") break;
      if (status.status === "IN_QUEUE") assert.equal(typeof status.queue_position, "number");
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(status.status, "COMPLETED");
    assert.ok(Array.isArray(status.logs));
    const result = await fal.queue.result(ENDPOINT, { requestId: request_id });
    assert.equal(result.requestId, request_id);
    checkOutput(result.data);
    return { requestId: request_id, statuses: [...new Set(statuses)] };
  },

  async streamStatus() {
    const { request_id } = await fal.queue.submit(ENDPOINT, { input: INPUT });
    const stream = await fal.queue.streamStatus(ENDPOINT, { requestId: request_id, logs: true });
    const seen = [];
    stream.on("data", (d) => seen.push(d.status));
    const done = await stream.done();
    assert.equal(done.status, "COMPLETED", JSON.stringify(done));
    assert.equal(seen[seen.length - 1], "COMPLETED");
    const result = await fal.queue.result(ENDPOINT, { requestId: request_id });
    checkOutput(result.data);
    return { statuses: [...new Set(seen)] };
  },

  async stream() {
    const stream = await fal.stream(ENDPOINT, { input: INPUT });
    const events = [];
    for await (const event of stream) events.push(event);
    const done = await stream.done();
    assert.ok(events.length >= 1, "no events");
    checkOutput(done); // the last event is the complete output
    assert.deepEqual(done, events[events.length - 1]);
    assert.ok(stream.requestId, "no x-fal-request-id on the stream response");
    return { events: events.length, requestId: stream.requestId };
  },

  async run() {
    const result = await fal.run(ENDPOINT, { input: INPUT });
    checkOutput(result.data);
    assert.ok(result.requestId);
    return { requestId: result.requestId };
  },

  async storage() {
    const bytes = new Uint8Array(4096).map((_, i) => (i * 7 + 3) % 256);
    const url = await fal.storage.upload(new Blob([bytes], { type: "image/png" }));
    assert.ok(url.startsWith(`${BASE}/files/`), url);
    const back = await download(url);
    assert.equal(back.type, "image/png");
    assert.deepEqual(back.bytes, bytes);
    // a File keeps its name
    const named = await fal.storage.upload(new File([new TextEncoder().encode("hi")], "note.txt", {
      type: "text/plain",
    }));
    assert.ok(named.endsWith("/note.txt"), named);
    assert.equal(new TextDecoder().decode((await download(named)).bytes), "hi");
    // a refused type surfaces as an ApiError with the status
    let refused = null;
    try {
      await fal.storage.upload(new Blob(["<b>x</b>"], { type: "text/html" }));
    } catch (e) {
      refused = e.status;
    }
    assert.equal(refused, 415);
    assert.ok(seenUrls.some((u) => u.includes("/storage/upload/initiate")));
    return { url, named };
  },

  async storageMultipart() {
    // above 90 MiB the client switches to its multipart protocol
    const size = 91 * 1024 * 1024 + 123;
    const bytes = new Uint8Array(size);
    for (let i = 0; i < size; i += 4096) bytes[i] = (i / 4096) % 251;
    const url = await fal.storage.upload(new Blob([bytes], { type: "application/octet-stream" }));
    assert.ok(seenUrls.some((u) => u.includes("/storage/upload/initiate-multipart")));
    const back = await download(url);
    assert.equal(back.bytes.length, size);
    assert.ok(Buffer.from(back.bytes).equals(Buffer.from(bytes)), "multipart content differs");
    return { url, size };
  },

  async editLora() {
    // An edit with a reference image and a LoRA, both uploaded through the client's storage first.
    const { readFileSync } = await import("node:fs");
    const imageUrl = await fal.storage.upload(new Blob([readFileSync(process.env.EDIT_IMAGE)], { type: "image/png" }));
    const loraUrl = await fal.storage.upload(
      new Blob([readFileSync(process.env.LORA_FILE)], { type: "application/octet-stream" }));
    const result = await fal.subscribe("fal-ai/flux-2/klein/9b/base/edit/lora", {
      input: {
        prompt: "make it night", seed: 7, num_inference_steps: 4, enable_safety_checker: false,
        image_urls: [imageUrl], loras: [{ path: loraUrl, scale: 0.8 }],
      },
      logs: true,
    });
    const img = result.data.images[0];
    const back = await download(img.url);
    return { imageUrl, loraUrl, width: img.width, height: img.height,
             png: Buffer.from(back.bytes).toString("base64") };
  },

  async transformInput() {
    // Blob inputs are uploaded by the client and replaced by their URL before submit.
    const transformed = await fal.storage.transformInput({
      prompt: "x",
      extra: [new Blob([new Uint8Array([1, 2, 3])], { type: "application/octet-stream" })],
    });
    assert.ok(typeof transformed.extra[0] === "string" && transformed.extra[0].startsWith(BASE));
    const back = await download(transformed.extra[0]);
    assert.deepEqual([...back.bytes], [1, 2, 3]);
    return { url: transformed.extra[0] };
  },

  async cancel() {
    // 50 steps, so the cancel lands first: while queued (cancelled at once) or running (stops at
    // its next step); either way the result is a 4xx with error_type "cancelled".
    const { request_id } = await fal.queue.submit(ENDPOINT, {
      input: { ...INPUT, num_inference_steps: 50, image_size: { width: 512, height: 512 } },
    });
    await fal.queue.cancel(ENDPOINT, { requestId: request_id });
    let status;
    for (let i = 0; i < 600; i++) {
      status = await fal.queue.status(ENDPOINT, { requestId: request_id });
      if (status.status === "COMPLETED") break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(status.status, "COMPLETED");
    let err = null;
    try {
      await fal.queue.result(ENDPOINT, { requestId: request_id });
    } catch (e) {
      err = e;
    }
    assert.ok(err && err.status >= 400 && err.status < 500, `expected a 4xx, got ${err && err.status}`);
    assert.equal(err.body.error_type, "cancelled");
    return { cancelledStatus: err.status };
  },

  async validation() {
    let err = null;
    try {
      await fal.run(ENDPOINT, { input: { prompt: "" } });
    } catch (e) {
      err = e;
    }
    assert.ok(err, "empty prompt was accepted");
    assert.equal(err.status, 422);
    assert.equal(err.name, "ValidationError");
    assert.ok(err.fieldErrors.length > 0);
    return { fieldErrors: err.fieldErrors.length };
  },
};

const name = process.argv[2];
if (!checks[name]) {
  console.error(`unknown check ${name}; one of: ${Object.keys(checks).join(", ")}`);
  process.exit(2);
}
try {
  const out = await checks[name]();
  console.log(JSON.stringify({ ok: true, check: name, ...out }));
} catch (e) {
  console.error(`check ${name} failed: ${e && e.stack ? e.stack : e}`);
  if (e && e.body) console.error(`body: ${JSON.stringify(e.body)}`);
  console.error(`requests: ${seenUrls.join("\n  ")}`);
  process.exit(1);
}
