// kiosk-bridge fleet page: vanilla JS, no dependency, nothing loaded from outside.
// It only reads: GET /ui/api/* (JSON) and the event stream /ui/api/events (SSE).
// Every text from the server goes into the page as textContent, never as HTML.
"use strict";
(() => {
  const ROW_H = 30; // px, as --row-h in app.css: the virtual table positions rows by it
  const OVERSCAN = 10;
  const DAY_MS = 86400000;
  const STATES = ["online", "offline", "lost", "unknown"];
  const CODE_NAMES = { o: "online", f: "announced offline", l: "lost", u: "unknown" };
  const STATE_CODE = { online: "o", offline: "f", lost: "l", unknown: "u" };
  const STATE_RANK = { lost: 0, offline: 1, unknown: 2, online: 3 };
  const OPEN_COMMANDS = ["queued", "sent", "delivered", "received"];

  const fleet = {
    rows: [], byId: new Map(), view: [], loaded: false, loading: null,
    bars: new Map(), barStart: 0, barEnd: 0,
    filter: { q: "", state: "", cms: "", flapping: false, noisy: false },
    sort: { key: "state", desc: false },
  };
  let skew = 0; // server clock minus ours, so "since" reads right on a skewed browser
  const now = () => Date.now() + skew;
  const $ = (sel, root) => (root || document).querySelector(sel);

  // --- small helpers -----------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  function duration(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h " + (m % 60) + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }
  const ago = (ms) => (ms ? duration(now() - ms) + " ago" : "-");
  const stamp = (ms) => (ms ? new Date(ms).toLocaleString() : "");
  async function getJSON(url) {
    const res = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (res.status === 401) { location.replace("/"); throw new Error("signed out"); }
    if (!res.ok) throw new Error(url + ": HTTP " + res.status);
    return res.json();
  }
  function debounce(fn, ms) {
    let t = null;
    return () => { if (t === null) t = setTimeout(() => { t = null; fn(); }, ms); };
  }
  function bar(segments, start, end, big) {
    const node = el("div", { class: big ? "bar big" : "bar" });
    const span = end - start || 1;
    (segments || []).forEach((seg, i) => {
      const from = Math.max(seg[0], start);
      const to = i + 1 < segments.length ? segments[i + 1][0] : end;
      if (to <= from) return;
      const part = el("span", { class: "b-" + seg[1], title: CODE_NAMES[seg[1]] + " from " + stamp(from) });
      // Anchored at its end, so a segment too short to see grows (min-width) into the
      // past instead of out of the bar: the newest change always shows.
      part.style.right = ((end - to) / span) * 100 + "%";
      part.style.width = ((to - from) / span) * 100 + "%";
      node.append(part);
    });
    return node;
  }
  function legend() {
    return el("div", { class: "legend" }, ...["o", "f", "l", "u"].map((c) =>
      el("span", {}, el("i", { class: "b-" + c }), CODE_NAMES[c])));
  }

  // --- data ----------------------------------------------------------------------------
  function toRow(cols, values) {
    const r = {};
    cols.forEach((c, i) => { r[c] = values[i]; });
    return {
      id: r.device_id, name: r.name || "", state: r.state, since: r.since_ms, reason: r.reason || "",
      cms: r.cms_status || "", flapping: !!r.flapping, noisy: !!r.noisy,
      battery: r.battery, lastSeen: r.last_seen_ms,
    };
  }
  async function loadFleet() {
    if (fleet.loading) return fleet.loading;
    fleet.loading = (async () => {
      try {
        const data = await getJSON("/ui/api/fleet");
        skew = data.now_ms - Date.now();
        fleet.rows = data.rows.map((v) => toRow(data.columns, v));
        fleet.byId = new Map(fleet.rows.map((r) => [r.id, r]));
        fleet.loaded = true;
        refilter();
      } finally { fleet.loading = null; }
    })();
    return fleet.loading;
  }
  async function loadUptime() {
    const data = await getJSON("/ui/api/uptime");
    fleet.bars = new Map(Object.entries(data.bars));
    fleet.barStart = data.start_ms; fleet.barEnd = data.end_ms;
    if (route().page === "fleet") paintRows(true);
    if (!document.body.dataset.uptimeRendered) {
      document.body.dataset.uptimeRendered = String(fleet.bars.size);
      performance.mark("kb-uptime-rendered");
    }
  }
  const reloadFleet = debounce(() => loadFleet().catch(report), 400);

  function matches(r, f, q) {
    if (f.state && r.state !== f.state) return false;
    if (f.cms && r.cms !== f.cms) return false;
    if (f.flapping && !r.flapping) return false;
    if (f.noisy && !r.noisy) return false;
    if (q && !(r.id.toLowerCase().includes(q) || r.name.toLowerCase().includes(q) ||
      r.reason.toLowerCase().includes(q))) return false;
    return true;
  }
  const SORTS = {
    device: (r) => r.id, state: (r) => STATE_RANK[r.state], since: (r) => r.since, reason: (r) => r.reason,
    cms: (r) => r.cms, battery: (r) => r.battery, seen: (r) => r.lastSeen,
  };
  function refilter() {
    const f = fleet.filter, q = f.q.trim().toLowerCase();
    const get = SORTS[fleet.sort.key] || SORTS.device;
    const dir = fleet.sort.desc ? -1 : 1;
    fleet.view = fleet.rows.filter((r) => matches(r, f, q)).sort((a, b) => {
      const x = get(a), y = get(b);
      if (x === y || (x == null && y == null)) return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
      if (x == null) return 1; // missing values last either way
      if (y == null) return -1;
      return (x < y ? -1 : 1) * dir;
    });
    if (route().page === "fleet") { paintCounts(); paintRows(true); }
  }

  // --- live events -------------------------------------------------------------------
  let source = null, opened = false;
  const listeners = new Set(); // page-level reactions to events (device, commands pages)
  function connect() {
    if (source) source.close();
    source = new EventSource("/ui/api/events");
    const live = $("#live");
    source.addEventListener("open", () => {
      live.textContent = "live"; live.className = "live on";
      if (opened) reloadFleet(); // events may have been missed while away
      opened = true;
    });
    source.addEventListener("error", () => {
      live.textContent = "reconnecting"; live.className = "live off";
      checkStatus(); // a 401 there means the session ended: back to the login form
    });
    source.addEventListener("overflow", () => { connect(); reloadFleet(); });
    source.addEventListener("presence", (e) => onPresence(JSON.parse(e.data)));
    source.addEventListener("command", (e) => { const d = JSON.parse(e.data); listeners.forEach((f) => f("command", d)); });
  }
  function onPresence(ev) {
    const r = fleet.byId.get(ev.device_id);
    if (!r) { reloadFleet(); } else {
      r.state = ev.to; r.reason = ev.reason || ""; r.since = ev.received_ms;
      if (ev.status) r.cms = ev.status;
      r.flapping = !!ev.flapping;
      if (ev.to === "online") r.lastSeen = ev.received_ms;
      const segs = fleet.bars.get(r.id) || [[fleet.barStart || now() - DAY_MS, "u"]];
      const code = STATE_CODE[ev.to] || "u";
      if (segs[segs.length - 1][1] !== code) segs.push([ev.received_ms, code]);
      fleet.bars.set(r.id, segs);
      fleet.barEnd = Math.max(fleet.barEnd, now());
      scheduleRefilter();
    }
    listeners.forEach((f) => f("presence", ev));
  }
  let refilterPending = false;
  function scheduleRefilter() {
    // A storm of events costs one filter and one paint per frame, not one per event.
    if (refilterPending) return;
    refilterPending = true;
    requestAnimationFrame(() => { refilterPending = false; refilter(); });
  }

  // --- stale banner (HOOK: bridge liveness) ---------------------------------------------
  async function checkStatus() {
    try {
      const s = await getJSON("/ui/api/status");
      const banner = $("#stale-banner");
      if (s.stale === true) {
        banner.textContent = s.message || "Device states may be stale: no bridge has written anything since " +
          (s.newest_write_ms ? stamp(s.newest_write_ms) + " (" + ago(s.newest_write_ms) + ")" : "a while") +
          ", yet " + s.online + " device(s) are shown online.";
        banner.hidden = false;
      } else banner.hidden = true;
    } catch (err) { /* the stream's own reconnect reports the outage */ }
  }

  // --- routing -------------------------------------------------------------------------
  function route() {
    const h = location.hash.replace(/^#/, "");
    let m = h.match(/^\/device\/(.+)$/);
    if (m) return { page: "device", id: decodeURIComponent(m[1]) };
    if (h.startsWith("/commands")) return { page: "commands" };
    return { page: "fleet" };
  }
  let teardown = () => {};
  function show() {
    teardown(); teardown = () => {};
    listeners.clear();
    const r = route(), view = $("#view");
    view.replaceChildren();
    $("#nav-fleet").classList.toggle("active", r.page === "fleet");
    $("#nav-commands").classList.toggle("active", r.page === "commands");
    if (r.page === "device") showDevice(view, r.id);
    else if (r.page === "commands") showCommands(view);
    else showFleet(view);
  }
  function report(err) {
    if (String(err && err.message) === "signed out") return;
    const view = $("#view");
    view.append(el("p", { class: "error", text: "Could not load: " + (err && err.message) }));
  }

  // --- the fleet page ------------------------------------------------------------------
  const COLS = [
    ["device", "Device"], ["state", "State"], ["since", "Since"], ["cms", "CMS status"],
    ["marks", "Marks"], ["battery", "Battery"], ["seen", "Last seen"], ["bar", "Last 24 h"],
  ];
  function showFleet(view) {
    const f = fleet.filter;
    const search = el("input", { type: "search", id: "search", placeholder: "Search id, name, reason", value: f.q,
      oninput: (e) => { f.q = e.target.value; scheduleRefilter(); } });
    const stateSel = el("select", { id: "filter-state", onchange: (e) => { f.state = e.target.value; refilter(); } },
      el("option", { value: "", text: "any state" }), ...STATES.map((s) => el("option", { value: s, text: s })));
    stateSel.value = f.state;
    const cmsSel = el("select", { id: "filter-cms", onchange: (e) => { f.cms = e.target.value; refilter(); } },
      el("option", { value: "", text: "any CMS status" }), el("option", { value: "Connected", text: "Connected" }),
      el("option", { value: "Disconnected", text: "Disconnected" }));
    cmsSel.value = f.cms;
    const check = (key, label) => el("label", {}, el("input", { type: "checkbox", id: "filter-" + key, checked: f[key],
      onchange: (e) => { f[key] = e.target.checked; refilter(); } }), " " + label);
    view.append(el("div", { class: "toolbar" }, search, stateSel, cmsSel, check("flapping", "flapping"),
      check("noisy", "noisy"), el("div", { class: "counts", id: "counts" })));
    const head = el("div", { class: "grid thead", id: "fleet-head" }, ...COLS.map(([key, label]) => el("div", {
      "data-key": key, text: label, onclick: () => {
        if (!SORTS[key]) return;
        if (fleet.sort.key === key) fleet.sort.desc = !fleet.sort.desc; else fleet.sort = { key, desc: false };
        refilter();
      } })));
    const spacer = el("div", { class: "spacer", id: "fleet-spacer" });
    const scroller = el("div", { class: "scroller", id: "fleet-scroller", onscroll: () => paintRows(false) }, spacer);
    view.append(head, scroller, legend());
    if (fleet.loaded) { paintCounts(); paintRows(true); } else spacer.append(el("div", { class: "empty", text: "Loading..." }));
    const tick = setInterval(() => paintRows(true), 15000); // "since" and "last seen" keep ageing
    teardown = () => clearInterval(tick);
  }
  function paintCounts() {
    const counts = $("#counts");
    if (!counts) return;
    const n = { online: 0, offline: 0, lost: 0, unknown: 0 };
    for (const r of fleet.rows) n[r.state] = (n[r.state] || 0) + 1;
    counts.replaceChildren(el("span", { id: "count-shown", text: fleet.view.length + " of " + fleet.rows.length }),
      ...STATES.map((s) => el("span", { class: "count", "data-state": s, title: "show only " + s,
        onclick: () => { fleet.filter.state = fleet.filter.state === s ? "" : s; $("#filter-state").value = fleet.filter.state; refilter(); } },
        el("span", { class: "dot s-" + s }), s + " " + n[s])));
    for (const node of document.querySelectorAll("#fleet-head > div")) {
      node.classList.toggle("sorted", node.dataset.key === fleet.sort.key);
      node.classList.toggle("desc", node.dataset.key === fleet.sort.key && fleet.sort.desc);
    }
  }
  let painted = { first: -1, last: -1, len: -1 };
  function paintRows(force) {
    const scroller = $("#fleet-scroller"), spacer = $("#fleet-spacer");
    if (!scroller || !fleet.loaded) return;
    // Only the rows in sight (and a few around) exist in the DOM: 10,000 devices cost
    // as much to draw as 40.
    const total = fleet.view.length;
    const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_H) - OVERSCAN);
    const last = Math.min(total, Math.ceil((scroller.scrollTop + scroller.clientHeight) / ROW_H) + OVERSCAN);
    if (!force && first === painted.first && last === painted.last && total === painted.len) return;
    painted = { first, last, len: total };
    spacer.style.height = total * ROW_H + "px";
    const rows = [];
    for (let i = first; i < last; i++) rows.push(rowNode(fleet.view[i], i));
    if (!total) rows.push(el("div", { class: "empty", text: fleet.rows.length ? "No device matches." : "No devices yet." }));
    spacer.replaceChildren(...rows);
    if (!document.body.dataset.fleetRendered) {
      document.body.dataset.fleetRendered = String(fleet.rows.length);
      performance.mark("kb-fleet-rendered");
    }
  }
  function rowNode(r, i) {
    const row = el("div", { class: "grid row", "data-device": r.id, "data-state": r.state },
      el("div", {}, el("a", { href: "#/device/" + encodeURIComponent(r.id), text: r.id }),
        r.name ? el("span", { class: "name", text: r.name }) : null),
      el("div", { title: r.reason }, el("span", { class: "dot s-" + r.state }), r.state,
        r.reason ? el("span", { class: "reason", text: "(" + r.reason + ")" }) : null),
      el("div", { title: stamp(r.since), text: ago(r.since) }),
      el("div", { class: "cms-" + r.cms, text: r.cms }),
      el("div", {}, r.flapping ? el("span", { class: "mark flap", text: "flapping", title: "held Disconnected until it settles" }) : null,
        r.noisy ? el("span", { class: "mark noisy", text: "noisy", title: "status throttled: sends too often" }) : null),
      el("div", { text: r.battery == null ? "-" : r.battery + "%" }),
      el("div", { title: stamp(r.lastSeen), text: ago(r.lastSeen) }),
      el("div", {}, bar(fleet.bars.get(r.id) || [[fleet.barStart || now() - DAY_MS, "u"]],
        fleet.barStart || now() - DAY_MS, Math.max(fleet.barEnd, now()), false)));
    row.style.top = i * ROW_H + "px";
    return row;
  }

  // --- the device page -----------------------------------------------------------------
  function showDevice(view, id) {
    const box = el("div", { id: "device", "data-device": id }, el("p", { class: "muted", text: "Loading " + id + "..." }));
    view.append(el("p", {}, el("a", { href: "#/", text: "\u2190 fleet" })), box);
    const load = () => getJSON("/ui/api/devices/" + encodeURIComponent(id)).then((d) => paintDevice(box, d), (err) => {
      box.replaceChildren(el("p", { class: "error", text: String(err.message) }));
    });
    const again = debounce(load, 300);
    listeners.add((kind, ev) => { if (ev.device_id === id) again(); });
    load();
  }
  function fact(label, value) { return el("div", {}, el("b", { text: label }), value == null || value === "" ? "-" : String(value)); }
  function paintDevice(box, d) {
    const c = d.connectivity || {}, r = d.remote || {};
    box.dataset.state = d.state;
    const pct = (a) => (a && a.availability_percent != null ? a.availability_percent.toFixed(2) + "%" : "unknown");
    box.replaceChildren(
      el("h2", {}, d.device_id + " ", el("span", { class: "badge " + d.state, id: "device-state", text: d.state }),
        r.name ? el("span", { class: "name muted", text: " " + r.name }) : null),
      el("ul", { class: "why", id: "why" }, ...d.why.map((line) => el("li", { text: line }))),
      el("div", { class: "facts" }, fact("since", c.since_ms ? stamp(c.since_ms) + " (" + ago(c.since_ms) + ")" : null),
        fact("reason", c.reason), fact("session", c.session), fact("CMS status", r.status),
        fact("flapping", c.flapping ? "yes (" + c.transitions + " transitions)" : "no"),
        fact("battery", r.battery == null ? null : r.battery + "%"), fact("wifi", r.wifi), fact("last seen", ago(r.last_seen_ms)),
        fact("app", r.app_version), fact("android", r.android_version), fact("ip", r.ip_address),
        fact("uptime 24 h / 7 d", pct(d.uptime["24h"]) + " / " + pct(d.uptime["7d"]))),
      el("h3", { text: "Last 24 hours" }), bar(d.bar.segments, d.bar.start_ms, d.bar.end_ms, true), legend(),
      el("div", { class: "cols2" },
        el("div", {}, el("h3", { text: "Timeline (newest first)" }),
          el("table", { class: "list", id: "timeline" }, el("tr", {}, el("th", { text: "when" }), el("th", { text: "event" })),
            ...d.timeline.map((e) => el("tr", { class: e.ignored ? "ignored" : "", "data-kind": e.kind },
              el("td", { title: e.at, text: stamp(e.at_ms) }), el("td", { class: "k-" + e.kind, text: e.text }))))),
        el("div", {}, el("h3", { text: "Recent commands" }), commandTable(d.commands.map((x) => ({ ...x, device_id: d.device_id })), false))));
  }
  function commandTable(cmds, withDevice) {
    if (!cmds.length) return el("p", { class: "muted", text: "No commands." });
    return el("table", { class: "list commands" },
      el("tr", {}, el("th", { text: "created" }), withDevice ? el("th", { text: "device" }) : null, el("th", { text: "type" }),
        el("th", { text: "state" }), el("th", { text: "attempts" }), el("th", { text: "detail" })),
      ...cmds.map((c) => el("tr", { "data-command": c.id },
        el("td", { title: c.id, text: stamp(c.created_ms) }),
        withDevice ? el("td", {}, el("a", { href: "#/device/" + encodeURIComponent(c.device_id), text: c.device_id })) : null,
        el("td", { text: c.type }), el("td", { text: c.state }), el("td", { text: c.attempts }),
        el("td", { text: [c.detail, c.reason, c.requested_by && "by " + c.requested_by].filter(Boolean).join(" \u00b7 ") }))));
  }

  // --- the commands page ---------------------------------------------------------------
  function showCommands(view) {
    const box = el("div", { id: "commands" });
    const stateSel = el("select", { id: "command-state", onchange: () => load() }, el("option", { value: "", text: "any state" }),
      ...["queued", "sent", "delivered", "received", "succeeded", "failed", "rejected", "expired", "cancelled", "superseded"]
        .map((s) => el("option", { value: s, text: s })));
    const device = el("input", { type: "search", id: "command-device", placeholder: "device id", onchange: () => load() });
    view.append(el("div", { class: "toolbar" }, stateSel, device), box);
    const load = () => {
      const q = new URLSearchParams({ limit: "300" });
      if (stateSel.value) q.set("state", stateSel.value);
      if (device.value.trim()) q.set("device", device.value.trim());
      return getJSON("/ui/api/commands?" + q).then((d) => paintCommands(box, d), (err) => {
        box.replaceChildren(el("p", { class: "error", text: String(err.message) }));
      });
    };
    const again = debounce(load, 700);
    listeners.add((kind) => { if (kind === "command") again(); });
    load();
  }
  function progress(f) {
    const node = el("div", { class: "progress", title: Object.entries(f.by_state).map(([s, n]) => s + " " + n).join(", ") });
    for (const [s, n] of Object.entries(f.by_state)) {
      const part = el("span", { class: OPEN_COMMANDS.includes(s) ? "p-open" : "p-" + s });
      part.style.width = (n / f.total) * 100 + "%";
      node.append(part);
    }
    return node;
  }
  function paintCommands(box, d) {
    const fan = d.fanouts.length ? el("table", { class: "list", id: "fanouts" },
      el("tr", {}, ...["created", "type", "requested by", "devices", "done", "progress"].map((t) => el("th", { text: t }))),
      ...d.fanouts.map((f) => el("tr", {}, el("td", { text: stamp(f.created_ms) }), el("td", { text: f.type }),
        el("td", { text: f.requested_by || "-" }), el("td", { text: f.total }),
        el("td", { text: (f.total - f.open) + " / " + f.total }), el("td", {}, progress(f)))))
      : el("p", { class: "muted", text: "No request reached several devices in the last 24 hours." });
    box.replaceChildren(el("h3", { text: "Fan-outs (last 24 h)" }), fan,
      el("h3", { text: "Ledger (newest first)" }), commandTable(d.commands, true));
  }

  // --- start -----------------------------------------------------------------------------
  window.addEventListener("hashchange", show);
  show();
  connect();
  loadFleet().then(() => loadUptime()).catch(report);
  checkStatus();
  setInterval(checkStatus, 30000);
  setInterval(reloadFleet, 60000); // battery and last seen change without events
  setInterval(() => loadUptime().catch(() => {}), 300000);
})();
