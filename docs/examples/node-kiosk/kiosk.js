#!/usr/bin/env node
// A minimal kiosk written from docs/CONTRACT.md (contract 1.1) with MQTT.js, and nothing
// else from this repository. Clause ids in the comments (KB-...) point at the contract.
//
//   node kiosk.js --host 127.0.0.1 --port 1883 --device-id kiosk-0042 \
//       [--username kiosk-0042 --password TOKEN] [--keepalive 10] \
//       [--protocol auto|5|4] [--state-dir DIR]
//
// What it does: Will + birth + status + config, commands with acks and de-duplication,
// presence healing, a clean stop on SIGTERM/SIGINT, and reconnection with capped
// exponential backoff and jitter. Its session counter, handled command ids, config and
// token live in one JSON file (default: $TMPDIR/kiosk-bridge-node-kiosk/<id>.json),
// replaced atomically.
"use strict";

const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const mqtt = require("mqtt");

const PREFIX = "kiosk/v1";
const DEVICE_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const TOKEN = /^[0-9a-f]{64}$/;
const KNOWN_TYPES = new Set(["refresh", "reconnect", "wipe", "set_config", "rotate_token"]);
const NAMED_TYPES = new Set(["wipe", "rotate_token"]); // must carry our device_id
const MAX_COMMANDS = 1000; // remembered ids (contract: the last 1,000)
const BACKOFF_BASE_MS = 1000;
const BACKOFF_CAP_MS = 60000;
const HEAL_LIMIT = 5; // re-births per 10 s at most: another client may fight for the topic
const SETTLE_MS = 1000; // KB-PRES-7: how long a presence value must stand before healing
const UNSUPPORTED_PROTOCOL = 0x84; // CONNACK reason on MQTT 5; what NATS answers

// --- arguments ------------------------------------------------------------------------

function parseArgs(argv) {
  const opts = { keepalive: 10, protocol: "auto" };
  for (let i = 0; i < argv.length; i += 1) {
    const key = argv[i];
    const value = argv[i + 1];
    const take = (name) => {
      if (value === undefined) usage(`${key} needs a value`);
      opts[name] = value;
      i += 1;
    };
    if (key === "--host") take("host");
    else if (key === "--port") take("port");
    else if (key === "--device-id") take("deviceId");
    else if (key === "--username") take("username");
    else if (key === "--password") take("password");
    else if (key === "--keepalive") take("keepalive");
    else if (key === "--protocol") take("protocol");
    else if (key === "--state-dir") take("stateDir");
    else if (key === "--help" || key === "-h") usage(null);
    else usage(`unknown argument ${key}`);
  }
  if (!opts.host || !opts.port || !opts.deviceId) usage("--host, --port and --device-id are required");
  if (!DEVICE_ID.test(opts.deviceId)) usage(`invalid device id ${JSON.stringify(opts.deviceId)}`);
  opts.port = Number(opts.port);
  opts.keepalive = Number(opts.keepalive);
  // KB-CONN-3: 10 to 30 s.
  if (!(opts.keepalive >= 10 && opts.keepalive <= 30)) usage("--keepalive must be 10..30");
  if (!["auto", "5", "4"].includes(opts.protocol)) usage("--protocol must be auto, 5 or 4");
  opts.stateDir = opts.stateDir || path.join(os.tmpdir(), "kiosk-bridge-node-kiosk");
  return opts;
}

function usage(error) {
  const text =
    "usage: node kiosk.js --host H --port P --device-id ID [--username U --password P]\n" +
    "                     [--keepalive 10..30] [--protocol auto|5|4] [--state-dir DIR]";
  if (error) {
    console.error(`error: ${error}\n${text}`);
    process.exit(2);
  }
  console.log(text);
  process.exit(0);
}

const opts = parseArgs(process.argv.slice(2));
const id = opts.deviceId;
const topics = {
  presence: `${PREFIX}/${id}/presence`,
  status: `${PREFIX}/${id}/status`,
  cmd: `${PREFIX}/${id}/cmd`,
  ack: `${PREFIX}/${id}/ack`,
  config: `${PREFIX}/${id}/config`,
};
const log = (...args) => console.error(new Date().toISOString(), `[${id}]`, ...args);

// --- persistent state ---------------------------------------------------------------

const statePath = path.join(opts.stateDir, `${id}.json`);

function loadState() {
  try {
    const doc = JSON.parse(fs.readFileSync(statePath, "utf8"));
    return {
      lastSession: Number(doc.lastSession) || 0,
      commands: new Map(doc.commands || []),
      config: doc.config || null,
      token: doc.token || null,
    };
  } catch (err) {
    if (err.code !== "ENOENT") log(`state file unreadable (${err.message}); starting afresh`);
    return { lastSession: 0, commands: new Map(), config: null, token: null };
  }
}

function saveState() {
  // Temp file + rename: a power cut leaves the old file or the new one, never half.
  fs.mkdirSync(opts.stateDir, { recursive: true });
  const tmp = `${statePath}.${process.pid}.tmp`;
  const doc = {
    lastSession: state.lastSession,
    commands: [...state.commands.entries()].slice(-MAX_COMMANDS),
    config: state.config,
    token: state.token,
  };
  const fd = fs.openSync(tmp, "w", 0o600); // the token is in here: owner only
  try {
    fs.writeSync(fd, JSON.stringify(doc));
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, statePath);
}

const state = loadState();

function nextSession() {
  // KB-PRES-3: strictly larger at every connection, persisted before CONNECT (it is in
  // the Will). The clock keeps it growing if the file is lost, +1 if the clock steps back.
  state.lastSession = Math.max(state.lastSession + 1, Date.now());
  saveState();
  return state.lastSession;
}

function remember(commandId, ackState, detail) {
  state.commands.delete(commandId); // re-insert: the Map keeps insertion order
  state.commands.set(commandId, { state: ackState, detail: detail || null });
  while (state.commands.size > MAX_COMMANDS) state.commands.delete(state.commands.keys().next().value);
  saveState();
}

// --- connection -----------------------------------------------------------------------

let client = null;
let conn = null; // { session, v5, live, seq, heals: [] }
let attempt = 0;
let protocol = opts.protocol === "4" ? 4 : 5;
let protocolSettled = opts.protocol !== "auto";
let reconnectTimer = null;
let statusTimer = null;
let stopping = false;
let cycling = false; // between a reconnect command's DISCONNECT and its new CONNECT
const running = new Set(); // command ids whose handler runs in this process

function backoffDelay() {
  // KB-NET-3: capped exponential backoff with jitter ("equal jitter": half fixed, half
  // random), so a fleet that lost the broker together does not come back as a herd.
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.min(attempt, 30));
  attempt += 1;
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

function scheduleReconnect(delayMs) {
  clearTimeout(reconnectTimer);
  log(`reconnecting in ${(delayMs / 1000).toFixed(2)} s`);
  reconnectTimer = setTimeout(connect, delayMs);
}

function connect() {
  reconnectTimer = null;
  if (stopping) return;
  const session = nextSession();
  const v5 = protocol === 5;
  const password = state.token || opts.password;
  const thisConn = { session, v5, live: false, seq: 0, heals: [], connacked: false, last: null, healTimer: null };
  conn = thisConn;
  // One client per attempt: the Will, which carries the session, is part of CONNECT,
  // so MQTT.js's own reconnect (same CONNECT again) is switched off (reconnectPeriod 0).
  const c = mqtt.connect({
    host: opts.host,
    port: opts.port,
    protocol: "mqtt",
    protocolVersion: protocol,
    clientId: id, // KB-CONN-1
    username: opts.username || id,
    password: password || undefined,
    clean: false, // KB-CONN-2: Clean Start 0 / clean_session 0 ...
    properties: v5 ? { sessionExpiryInterval: 86400 } : undefined, // ... and a session expiry
    keepalive: opts.keepalive,
    reconnectPeriod: 0,
    connectTimeout: 15000,
    // KB-PRES-1: the Will is our own presence, retained, QoS 1, of this session.
    will: { topic: topics.presence, payload: JSON.stringify({ state: "lost", session }), qos: 1, retain: true },
  });
  client = c;
  // Process a message before MQTT.js sends its PUBACK: a command id is persisted first,
  // so a crash in between gets the command redelivered (and de-duplicated), not lost.
  c.handleMessage = (packet, done) => {
    try {
      if (c === client) onMessage(packet);
    } catch (err) {
      log(`message handling failed: ${err.stack || err}`);
    }
    done();
  };
  c.on("connect", () => onConnack(c, thisConn));
  c.on("error", (err) => {
    log(`MQTT error: ${err.message} (code ${err.code})`);
    if (v5 && !protocolSettled && (err.code === UNSUPPORTED_PROTOCOL || err.code === 1)) {
      // NATS's MQTT refuses MQTT 5 cleanly: fall back to 3.1.1 at once.
      protocol = 4;
      protocolSettled = true;
      thisConn.fallback = true;
    }
  });
  c.on("close", () => onClose(c, thisConn));
}

function onConnack(c, thisConn) {
  if (c !== client) return;
  thisConn.connacked = true;
  protocolSettled = true;
  log(`connected, session ${thisConn.session} (MQTT ${thisConn.v5 ? 5 : "3.1.1"})`);
  // KB-PRES-2: the birth first, then subscribe once it is acknowledged, so what the
  // broker replays on presence is our own birth (or an older session's Will that
  // overwrote it since: the one thing worth healing, KB-PRES-6). Waiting for the PUBACK
  // matters with MQTT.js: it writes a QoS 1 publish after an asynchronous store step, so
  // a subscribe issued right after it could reach the broker first.
  publishBirth(c, thisConn, () => {
    attempt = 0; // a full connection: the backoff starts again from its base
    c.subscribe([topics.cmd, topics.config, topics.presence], { qos: 1 }, (err) => {
      if (err) log(`subscribe failed: ${err.message}`);
    });
  });
  thisConn.live = true;
  publishStatus();
  scheduleStatus();
}

function onClose(c, thisConn) {
  if (c !== client) return;
  client = null;
  thisConn.live = false;
  clearTimeout(thisConn.healTimer);
  clearTimeout(statusTimer);
  if (stopping || cycling) return;
  // KB-NET-3: a new connection, with a new session, after a backoff delay.
  scheduleReconnect(thisConn.fallback ? 0 : backoffDelay());
}

function publishBirth(c, thisConn, onAcked) {
  const birth = {
    schema_version: 1,
    state: "online",
    session: thisConn.session,
    ts: Date.now(),
    app_version: "node-kiosk-1.1.0",
  };
  c.publish(topics.presence, JSON.stringify(birth), { qos: 1, retain: true }, (err) => {
    if (!err && onAcked) onAcked();
  });
}

// Publish and wait for the PUBACK (or give up after 5 s: a dead link must not hang a stop).
function publishAcked(topic, payload, options) {
  return new Promise((resolve) => {
    const c = client;
    if (!c || !c.connected) return resolve(false);
    const timer = setTimeout(() => resolve(false), 5000);
    c.publish(topic, payload, options, (err) => {
      clearTimeout(timer);
      resolve(!err);
    });
  });
}

// KB-PRES-4: retained offline with a reason, wait for its PUBACK, then a normal
// DISCONNECT (reason 0), which tells the broker not to publish the Will.
async function announceOfflineAndDisconnect(reason) {
  const c = client;
  if (!c || !conn) return;
  conn.live = false; // KB-PRES-5: from now on nothing is healed
  clearTimeout(statusTimer);
  const offline = { schema_version: 1, state: "offline", session: conn.session, ts: Date.now(), reason };
  if (c.connected) {
    const acked = await publishAcked(topics.presence, JSON.stringify(offline), { qos: 1, retain: true });
    if (!acked) log("offline announcement not confirmed");
  }
  await new Promise((resolve) => c.end(false, conn.v5 ? { reasonCode: 0 } : {}, resolve));
}

// --- status -----------------------------------------------------------------------------

function statusIntervalMs() {
  const seconds = state.config && Number.isInteger(state.config.status_interval_s) ? state.config.status_interval_s : 30;
  return seconds * 1000;
}

function scheduleStatus() {
  clearTimeout(statusTimer);
  // +-10% so a fleet that came up together does not report in step forever.
  statusTimer = setTimeout(() => {
    publishStatus();
    scheduleStatus();
  }, statusIntervalMs() * (0.9 + Math.random() * 0.2));
}

function publishStatus() {
  // KB-STAT-1: retained, of the current session, seq increasing within it.
  const c = client;
  if (!c || !conn || !conn.live) return;
  const status = { schema_version: 1, session: conn.session, seq: conn.seq, ts: Date.now(), screen_on: true };
  if (state.config) status.config_version = state.config.version;
  conn.seq += 1;
  c.publish(topics.status, JSON.stringify(status), { qos: 1, retain: true });
}

// --- receiving ----------------------------------------------------------------------------

function onMessage(packet) {
  const payload = packet.payload.toString("utf8");
  if (packet.topic === topics.cmd) onCommand(payload, packet.properties || {});
  else if (packet.topic === topics.config) onConfig(payload);
  else if (packet.topic === topics.presence) onPresence(payload);
}

function onPresence(payload) {
  // One topic's messages keep their order: the last value received is what the broker
  // retains now. It is judged once it has stood for SETTLE_MS (KB-PRES-7), so the backlog
  // of a resumed session (our previous connection's Will, queued there) is not answered.
  const current = conn;
  if (!current) return;
  try {
    current.last = payload ? JSON.parse(payload) : null;
  } catch (err) {
    current.last = null;
  }
  clearTimeout(current.healTimer);
  current.healTimer = setTimeout(() => settlePresence(current), SETTLE_MS);
}

function settlePresence(current) {
  const seen = current.last;
  if (current !== conn || !client || !current.live || stopping || cycling) return; // KB-PRES-5
  if (!seen || typeof seen !== "object" || !Number.isInteger(seen.session)) return; // empty or unreadable
  // Our own session (the birth's echo, or our own offline): nothing to do. A newer
  // session means another client with our id: answering would start a fight.
  if (seen.session >= current.session) return;
  // KB-PRES-6: an older session's value overwrote our live birth: say it again.
  const now = Date.now();
  current.heals = current.heals.filter((t) => now - t < 10000);
  if (current.heals.length >= HEAL_LIMIT) return;
  current.heals.push(now);
  log(`presence overwritten by session ${seen.session} (${seen.state}); re-publishing the birth`);
  publishBirth(client, current);
}

function onConfig(payload) {
  if (!payload) return;
  try {
    applyConfig(JSON.parse(payload));
  } catch (err) {
    log(`ignoring config: ${err.message}`);
  }
}

function applyConfig(config) {
  if (config === null || typeof config !== "object" || Array.isArray(config)) throw new Error("config is not an object");
  if (!Number.isInteger(config.version) || config.version < 0) throw new Error("config version must be an integer >= 0");
  const interval = config.status_interval_s === undefined || config.status_interval_s === null ? 30 : config.status_interval_s;
  if (!Number.isInteger(interval) || interval < 5 || interval > 3600) throw new Error("status_interval_s must be 5..3600");
  const current = state.config;
  if (current && config.version < current.version) {
    throw new Error(`config version ${config.version} is older than the applied ${current.version}`);
  }
  const changed = !current || current.version !== config.version;
  state.config = { ...config, status_interval_s: interval };
  saveState();
  if (changed) {
    // KB-CMD-4: report the applied version at once; the bridge shows drift until then.
    publishStatus();
    scheduleStatus();
  }
}

function sendAck(commandId, ackState, detail, properties) {
  // KB-CMD-1: always our own ack topic (the Response Topic is informative); the MQTT 5
  // Correlation Data is echoed as it came (the command id's UTF-8 text, 36 bytes).
  const ack = { schema_version: 1, id: commandId, state: ackState, ts: Date.now() };
  if (detail) ack.detail = String(detail).slice(0, 1024);
  const options = { qos: 1, retain: false };
  if (conn && conn.v5 && properties.correlationData) {
    options.properties = { correlationData: properties.correlationData };
  }
  return publishAcked(topics.ack, JSON.stringify(ack), options);
}

function finish(commandId, ackState, detail, properties) {
  remember(commandId, ackState, detail);
  return sendAck(commandId, ackState, detail, properties);
}

function decodeCommand(payload) {
  const cmd = JSON.parse(payload);
  if (cmd === null || typeof cmd !== "object" || Array.isArray(cmd)) throw new Error("not an object");
  if (typeof cmd.id !== "string" || !UUID.test(cmd.id)) throw new Error("id is not a UUID");
  if (typeof cmd.type !== "string" || !/^[a-z][a-z0-9_]*$/.test(cmd.type) || cmd.type.length > 32) throw new Error("bad type");
  if (!Number.isInteger(cmd.issued_at) || !Number.isInteger(cmd.expires_at)) throw new Error("bad times");
  cmd.id = cmd.id.toLowerCase();
  cmd.args = cmd.args && typeof cmd.args === "object" ? cmd.args : {};
  return cmd;
}

function onCommand(payload, properties) {
  if (stopping) return;
  let cmd;
  try {
    cmd = decodeCommand(payload);
  } catch (err) {
    // Without a valid id there is nothing to answer: logged and dropped.
    log(`ignoring undecodable command: ${err.message}`);
    return;
  }
  // KB-CMD-2: a remembered id is never run again; it is acked again with what it had.
  const record = state.commands.get(cmd.id);
  if (record) {
    if (record.state !== "received") sendAck(cmd.id, record.state, record.detail, properties);
    else if (running.has(cmd.id)) sendAck(cmd.id, "received", null, properties);
    else finish(cmd.id, "failed", "interrupted by a restart before it finished", properties);
    return;
  }
  // KB-CMD-7: expired, not run.
  if (cmd.expires_at < Date.now()) {
    finish(cmd.id, "rejected", "expired", properties);
    return;
  }
  // KB-CMD-8 and KB-CMD-5: unknown types, and commands for another device, refused.
  if (!KNOWN_TYPES.has(cmd.type)) {
    finish(cmd.id, "rejected", `unknown command type '${cmd.type}'`, properties);
    return;
  }
  if ((cmd.device_id !== undefined && cmd.device_id !== null) || NAMED_TYPES.has(cmd.type)) {
    if (cmd.device_id !== id) {
      finish(cmd.id, "rejected", `${cmd.type} addressed to ${JSON.stringify(cmd.device_id)}, this device is '${id}'`, properties);
      return;
    }
  }
  remember(cmd.id, "received"); // persisted before it runs
  running.add(cmd.id);
  sendAck(cmd.id, "received", null, properties);
  execute(cmd, properties).finally(() => running.delete(cmd.id));
}

async function execute(cmd, properties) {
  try {
    if (cmd.type === "refresh") {
      log(`refresh ${cmd.args.url || "(current page)"}`);
    } else if (cmd.type === "set_config") {
      applyConfig(cmd.args);
    } else if (cmd.type === "rotate_token") {
      // KB-CMD-6: stored durably first; used from the next connection on.
      if (typeof cmd.args.token !== "string" || !TOKEN.test(cmd.args.token)) throw new Error("token must be 64 lowercase hex characters");
      state.token = cmd.args.token;
      saveState();
    } else if (cmd.type === "reconnect") {
      const delay = cmd.args.delay_s === undefined ? 0 : cmd.args.delay_s;
      if (!Number.isInteger(delay) || delay < 0 || delay > 3600) throw new Error("delay_s must be 0..3600");
    } else if (cmd.type === "wipe") {
      // nothing to check: the device id was checked above
    }
  } catch (err) {
    await finish(cmd.id, "failed", err.message, properties);
    return;
  }
  // The operator sees "succeeded" (PUBACK awaited) before the device goes away.
  await finish(cmd.id, "succeeded", null, properties);
  if (cmd.type === "reconnect") await reconnectAfter(cmd.args.delay_s || 0);
  else if (cmd.type === "wipe") await wipe();
}

async function reconnectAfter(delayS) {
  // KB-CMD-3: offline (network_change), clean DISCONNECT, wait delay_s, new session.
  cycling = true;
  await announceOfflineAndDisconnect("network_change");
  clearTimeout(reconnectTimer);
  reconnectTimer = setTimeout(() => {
    cycling = false;
    attempt = 0;
    connect();
  }, delayS * 1000);
}

async function wipe() {
  // KB-CMD-9: announce offline with reason wipe, disconnect cleanly, forget everything.
  stopping = true;
  await announceOfflineAndDisconnect("wipe");
  fs.rmSync(statePath, { force: true });
  log("wiped: state and token deleted; exiting");
  process.exit(0);
}

async function cleanStop(signal) {
  if (stopping) return;
  stopping = true;
  clearTimeout(reconnectTimer);
  log(`${signal}: clean stop`);
  await announceOfflineAndDisconnect("shutdown");
  process.exit(0);
}

process.on("SIGTERM", () => cleanStop("SIGTERM"));
process.on("SIGINT", () => cleanStop("SIGINT"));

connect();
