// A device that asks the edge gateway for one job over MQTT 5 with MQTT.js, the raw way:
// the payload is the text or media itself, the request id travels as correlation data, the
// answer comes to our response topic (it must lie under edge/results/<device>/), params are
// user properties. Progress notes of long jobs are printed to stderr.
//
//   npm ci && node device.mjs --task tokenize --text "hello world" --param model=all-minilm-l6-v2
//   node device.mjs --task asr --file speech.wav
//   node device.mjs --task superres --file small.png --out big.png
//
// Options: --host (localhost) --port (1883) --device (dev-1; the MQTT username on a gateway
// with the shipped ACL) --username --password --ca FILE (TLS) --id (a fresh id) --timeout (600 s).
import { randomUUID } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import mqtt from "mqtt";

const { values: o } = parseArgs({ options: {
  host: { type: "string", default: "localhost" }, port: { type: "string", default: "1883" },
  device: { type: "string", default: "dev-1" }, task: { type: "string", default: "tokenize" },
  text: { type: "string" }, file: { type: "string" }, out: { type: "string" },
  param: { type: "string", multiple: true, default: [] }, id: { type: "string" },
  username: { type: "string" }, password: { type: "string" }, ca: { type: "string" },
  timeout: { type: "string", default: "600" } } });

const TYPES = { wav: "audio/wav", png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", webp: "image/webp" };
const id = o.id ?? randomUUID().replaceAll("-", "");
const replies = `edge/results/${o.device}/replies`;
const payload = o.file ? readFileSync(o.file) : Buffer.from(o.text ?? "", "utf8");
const contentType = o.file ? TYPES[o.file.split(".").pop().toLowerCase()] : "text/plain";
const userProperties = Object.fromEntries(o.param.map((p) => p.split(/=(.*)/s).slice(0, 2)));

const client = await mqtt.connectAsync(`${o.ca ? "mqtts" : "mqtt"}://${o.host}:${o.port}`, {
  protocolVersion: 5, clientId: `${o.device}-${id.slice(0, 8)}`, username: o.username,
  password: o.password, ca: o.ca ? readFileSync(o.ca) : undefined, reconnectPeriod: 0 });

const answer = new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`no answer in ${o.timeout} s`)), Number(o.timeout) * 1000);
  client.on("message", (topic, body, packet) => {
    const props = packet.properties ?? {};
    if (topic.startsWith("edge/progress/")) { process.stderr.write(`progress ${body}\n`); return; }
    // one response topic may carry answers to many requests: ours echoes our correlation data
    if (topic !== replies || props.correlationData?.toString() !== id) return;
    clearTimeout(timer);
    resolve({ body, props });
  });
});
await client.subscribeAsync([replies, `edge/progress/${o.device}/${id}`], { qos: 1 });
const properties = { responseTopic: replies, correlationData: Buffer.from(id), contentType };
// MQTT.js 5.16 never sends a PUBLISH whose userProperties is an empty object: leave it out
if (o.param.length) properties.userProperties = userProperties;
await client.publishAsync(`edge/jobs/${o.task}/${o.device}`, payload, { qos: 1, properties });

try {
  const { body, props } = await answer;
  if (props.contentType === "application/json") {
    process.stdout.write(`${body}\n`);                     // {"id","task","status","result"|"error"}
  } else {                                                  // a raw image answer: bytes + user properties
    writeFileSync(o.out ?? "answer.bin", body);
    process.stdout.write(`${JSON.stringify({ content_type: props.contentType, ...props.userProperties })}\n`);
  }
} finally {
  await client.endAsync();
}
