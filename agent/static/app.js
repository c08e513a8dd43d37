// edge-agent site page. Plain JavaScript, no dependencies, nothing from the internet.
// Live status arrives as Server-Sent Events (/v1/events/stream), scans over the
// WebSocket /v1/scans; everything else is the agent's JSON API with the session
// cookie. Text from the agent is always set with textContent, never as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

const state = {
  view: null,          // the latest /v1/page view
  features: {},
  stream: null,        // EventSource
  ws: null,            // scans WebSocket
  wsRetry: 1000,
  lastScan: null,
  recentPackages: [],
  roomsTimer: null,
  history: {},         // device -> {at, points}
};

// -- small helpers ----------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") Object.assign(node.style, value);  // CSSOM: allowed by the CSP
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  seconds = Math.max(0, seconds);
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} days`;
}

function sinceTs(iso) {
  const t = Date.parse(iso);
  return isNaN(t) ? null : (Date.now() - t) / 1000;
}

function clockTime(iso) {
  const t = new Date(iso);
  return isNaN(t) ? "" : t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    return { ok: false, status: 0, body: { error: "the agent did not answer (network); try again" } };
  }
  let data = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("application/json")) {
    try { data = await response.json(); } catch (err) { data = null; }
  } else if (type.startsWith("image/")) {
    data = await response.blob();
  }
  if (response.status === 401 && path !== "/v1/session") showSignIn("Signed out: sign in again.");
  return { ok: response.ok, status: response.status, body: data };
}

// -- sign-in ------------------------------------------------------------------------------

function showSignIn(message) {
  stopLive();
  $("#app").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message || "";
  $("#signin-token").focus();
}

async function showApp(name) {
  $("#signin").hidden = true;
  $("#app").hidden = false;
  $("#who").textContent = name ? `Signed in: ${name}` : "";
  route();
  startLive();
}

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#signin-token");
  const button = $("#signin-form button[type=submit]");
  button.disabled = true;
  const answer = await api("POST", "/v1/session", { token: input.value.trim() });
  button.disabled = false;
  if (answer.ok) {
    input.value = "";
    input.removeAttribute("aria-invalid");
    showApp(answer.body.name);
  } else {
    input.setAttribute("aria-invalid", "true");
    $("#signin-error").textContent = (answer.body && answer.body.error) || `sign-in failed (${answer.status})`;
  }
});

$("#signout").addEventListener("click", async () => {
  await api("DELETE", "/v1/session");
  showSignIn("Signed out.");
});

// -- views ---------------------------------------------------------------------------------

function route() {
  let name = (location.hash || "#health").slice(1);
  const tab = $(`.tab[data-view="${CSS.escape(name)}"]`);
  if (!tab || tab.hidden) name = "health";
  for (const t of $$(".tab")) {
    if (t.dataset.view === name) t.setAttribute("aria-current", "page");
    else t.removeAttribute("aria-current");
  }
  for (const v of $$(".view")) v.hidden = v.id !== `view-${name}`;
  if (name === "rooms") startRooms(); else stopRooms();
}
window.addEventListener("hashchange", route);

// -- live status (SSE) ---------------------------------------------------------------------

function startLive() {
  stopLive();
  const source = new EventSource("/v1/events/stream");
  state.stream = source;
  source.addEventListener("status", (event) => {
    $("#live").classList.add("on");
    try { render(JSON.parse(event.data)); } catch (err) { console.error(err); }
  });
  source.addEventListener("error", async () => {
    $("#live").classList.remove("on");
    if (source.readyState === EventSource.CLOSED) {
      // Closed for good: a 401 (signed out elsewhere) or the agent refused. Find out which.
      const who = await api("GET", "/v1/session");
      if (who.ok) setTimeout(startLive, 2000);
    }
  });
}

function stopLive() {
  if (state.stream) state.stream.close();
  state.stream = null;
  if (state.ws) { state.ws.onclose = null; state.ws.close(); }
  state.ws = null;
  stopRooms();
}

function render(view) {
  state.view = view;
  const status = view.status || {};
  $("#site-name").textContent = view.site.name;
  $("#site-id").textContent = view.site.name === view.site.id ? "" : view.site.id;
  document.title = `${view.site.name} · edge-agent`;
  const pill = $("#state-pill");
  // The pill agrees with the banner: HQ not acknowledging is not "healthy" to a manager.
  const hqDown = view.hq && !view.hq.reachable;
  pill.textContent = hqDown ? "HQ unreachable" : status.state === "healthy" ? "Healthy" : "Degraded";
  pill.className = `pill ${hqDown ? "degraded" : status.state}`;
  applyFeatures(view.features || {});
  renderBanner(view.hq);
  renderHq(view.hq, status.uplink || {});
  renderCompliance(view.compliance, status.outbox || {});
  renderOutbox(status.outbox || {});
  renderDevices(status.devices || []);
  renderReasons(status.reasons || []);
  renderAlarms(view.alarms || {}, status.reasons || [], view.hq);
  renderPrinters(status.devices || []);
}

function applyFeatures(features) {
  const changed = JSON.stringify(features) !== JSON.stringify(state.features);
  state.features = features;
  for (const tab of $$(".tab[data-feature]")) tab.hidden = !features[tab.dataset.feature];
  $("#pf-use-scan").hidden = !features.scans;
  if (features.scans && !state.ws) connectScans();
  if (changed) { route(); if (features.rooms) loadRoomNames(); }
}

function renderBanner(hq) {
  const banner = $("#hq-banner");
  if (!hq || hq.reachable) { banner.hidden = true; return; }
  const n = hq.waiting;
  banner.replaceChildren(
    `HQ unreachable - ${n} event${n === 1 ? "" : "s"} waiting to be sent`,
    el("small", { text: `${hq.message[0].toUpperCase()}${hq.message.slice(1)}. Keep working: sales, scans and plant events are saved on this box and sent to HQ when it is back.` }));
  banner.hidden = false;
}

function renderHq(hq, uplink) {
  const stateNode = $("#hq-state");
  stateNode.textContent = hq.reachable ? "✔ Connected" : "✖ Unreachable";
  stateNode.className = `big ${hq.reachable ? "ok" : "bad"}`;
  // Plain words first; the technical detail (host, socket error) is for IT, in small print.
  $("#hq-broker").replaceChildren(uplink.state === "connected" ? "connected" : "not connected",
    el("small", { class: "detail", text: ` ${hq.detail || ""}` }));
  $("#hq-last-ack").textContent = hq.last_ack_age_s === null ? "none yet" : `${ago(hq.last_ack_age_s)} ago`;
  $("#hq-waiting").textContent = hq.waiting === 0 ? "nothing: all sent"
    : `${hq.waiting} event${hq.waiting === 1 ? "" : "s"}, oldest ${ago(hq.oldest_age_s)}`
      + (hq.progress ? `; ${hq.progress}` : "");
}

function renderCompliance(compliance, outbox) {
  const box = $("#compliance");
  const rows = [];
  const hours = compliance.report_within_h;
  for (const kind of ["sale", "plant"]) {
    const c = compliance[kind] || {};
    const waiting = ((outbox.kinds || {})[kind] || {}).depth || 0;
    const share = c.share || 0;
    const level = share >= 1 ? "bad" : share >= 0.5 ? "warn" : "";
    const label = kind === "sale" ? "sale" : "plant event";
    rows.push(el("div", { class: "deadline" },
      el("div", {}, c.oldest_age_s === null || c.oldest_age_s === undefined
        ? el("span", {}, el("strong", { text: `No unsent ${label}s` }))
        : el("span", {}, `Oldest unsent ${label}: `, el("strong", { text: ago(c.oldest_age_s) }),
             ` of the ${hours} h deadline (${waiting} waiting)`)),
      el("div", { class: `meter ${level}`, role: "meter", "aria-label": `${label} deadline used`,
                  "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(Math.round(share * 100)) },
         el("span", { style: { width: `${Math.min(100, Math.max(share > 0 ? 2 : 0, share * 100)).toFixed(1)}%` } }))));
  }
  box.replaceChildren(...rows);
}

const KIND_NAMES = { sale: "Sales", plant: "Plant events", scan: "Scans", sensor: "Sensor readings",
                     print: "Prints", device: "Device events", alarm: "Alarms" };

function renderOutbox(outbox) {
  const kinds = outbox.kinds || {};
  $("#outbox-bytes").textContent = outbox.max_bytes
    ? `${(outbox.bytes / 1048576).toFixed(1)} of ${(outbox.max_bytes / 1048576).toFixed(0)} MiB` : "";
  const rows = Object.entries(kinds).map(([kind, k]) => el("tr", { class: k.depth ? "waiting" : "" },
    el("td", { text: KIND_NAMES[kind] || kind }),
    el("td", { class: "num" }, k.depth ? el("span", { class: "badge warn", text: String(k.depth) }) : "0"),
    el("td", { class: "num", text: k.oldest_age_s === null ? "—" : ago(k.oldest_age_s) }),
    el("td", { class: "num", text: String(k.last_seq || 0) })));
  $("#outbox-table tbody").replaceChildren(...rows);
}

function stateBadge(stateName) {
  const s = String(stateName || "unknown");
  const level = ["up", "ok", "connected", "ready"].includes(s) ? "ok"
    : ["down", "offline", "error", "fault"].includes(s) ? "bad" : "warn";
  return el("span", { class: `badge ${level}`, text: s });
}

function renderDevices(devices) {
  const list = $("#devices");
  if (!devices.length) {
    list.replaceChildren(el("li", { class: "muted", text: "No devices configured." }));
    return;
  }
  list.replaceChildren(...devices.map((d) => {
    const fault = d.last_fault || d.error;
    const down = ["down", "offline", "error", "fault"].includes(d.state);
    return el("li", {},
      el("span", { class: "name", text: d.id }),
      el("span", { class: "muted", text: [d.type, d.room, d.model].filter(Boolean).join(" · ") }),
      stateBadge(d.state),
      fault ? el("span", { class: `fault ${down ? "now" : ""}`, text: `Last fault: ${fault}` }) : null);
  }));
}

function renderReasons(reasons) {
  $("#card-reasons").hidden = reasons.length === 0;
  $("#reasons").replaceChildren(...reasons.map((r) => el("li", { text: r })));
}

// -- alarms --------------------------------------------------------------------------------

state.roomAlarms = [];

function renderAlarms(alarms, reasons, hq) {
  const open = [];
  if (hq && !hq.reachable) {
    open.push({ name: "HQ unreachable", severity: "critical",
                msg: `${hq.message}; ${hq.waiting} event${hq.waiting === 1 ? "" : "s"} waiting to be sent` });
  }
  for (const a of alarms.open || []) {
    open.push({ name: alarmName(a.code), severity: a.severity || "critical", msg: a.message, since: a.since });
  }
  for (const r of reasons) {
    const [code, ...rest] = String(r).split(":");
    if (["device_down", "uplink_down", "report_deadline"].includes(code)) {
      open.push({ name: alarmName(code), severity: "warning", msg: rest.join(":").trim() });
    }
  }
  for (const a of state.roomAlarms) {
    open.push({ name: `${a.room}: ${alarmName(a.code)}`, severity: a.severity || "warning", msg: a.message, since: a.ts });
  }
  const count = $("#alarm-count");
  count.textContent = String(open.length);
  count.hidden = open.length === 0;
  $("#alarms-open").replaceChildren(...(open.length ? open.map(alarmItem)
    : [el("li", { class: "muted", text: "No open alarms." })]));
  const recent = alarms.recent || [];
  const items = recent.map((a) => alarmItem({
    name: a.room ? `${a.room}: ${alarmName(a.code)}` : alarmName(a.code), severity: a.state === "cleared" ? "info" : a.severity,
    msg: a.message, since: a.ts, state: a.state, source: a.source }));
  if (alarms.missed) items.push(el("li", { class: "muted", text: `${alarms.missed} more already sent to HQ before this page read them.` }));
  $("#alarms-recent").replaceChildren(...(items.length ? items
    : [el("li", { class: "muted", text: "None since the agent started." })]));
}

// climate_temperature_high -> "climate temperature high": readable, still greppable in logs.
function alarmName(code) {
  return String(code || "alarm").replace(/_/g, " ");
}

function alarmItem(a) {
  const level = a.severity === "critical" ? "bad" : a.severity === "info" ? "ok" : "warn";
  return el("li", {},
    el("span", { class: `badge ${level}`, text: a.state === "cleared" ? "cleared" : (a.severity || "alarm") }),
    el("span", { class: "name", text: a.name }),
    a.since ? el("span", { class: "muted", text: clockTime(a.since) }) : null,
    a.source ? el("span", { class: "muted", text: `from ${a.source}` }) : null,
    a.msg ? el("span", { class: "msg", text: a.msg }) : null);
}

// -- field errors (the API's {"error", "field", "problems"}) ---------------------------------

function clearErrors(form) {
  for (const node of $$("[aria-invalid]", form)) node.removeAttribute("aria-invalid");
  for (const node of $$(".field-error", form)) node.textContent = "";
  const general = $(".form-error", form);
  general.hidden = true;
  general.textContent = "";
}

// data.plant_tags.0 -> the plant_tags input; package_tag or body.package_tag -> package_tag.
function inputFor(form, field) {
  const parts = String(field || "").split(".");
  for (const part of parts) {
    const input = form.elements.namedItem(part);
    if (input && input.tagName) return { input, index: parts[parts.indexOf(part) + 1] };
  }
  return null;
}

function showErrors(form, body, status, friendly) {
  const problems = (body && body.problems && body.problems.length) ? body.problems
    : [{ field: body && body.field, message: (body && body.error) || `the agent answered ${status}` }];
  const unplaced = [];
  let first = null;
  for (const p of problems) {
    const found = inputFor(form, p.field);
    if (!found) { unplaced.push(p.field ? `${p.field}: ${p.message}` : p.message); continue; }
    found.input.setAttribute("aria-invalid", "true");
    const out = $(`#${found.input.id}-error`);
    const text = friendly ? friendly(found.input.name, found.index, p.message) : p.message;
    if (out) out.textContent = out.textContent ? `${out.textContent} ${text}` : text;
    first = first || found.input;
  }
  if (unplaced.length) {
    const general = $(".form-error", form);
    general.textContent = unplaced.join(" · ");
    general.hidden = false;
  }
  if (first) first.focus();
}

// -- plant events ----------------------------------------------------------------------------

const ACTION_VERBS = { move: "Record move", waste: "Record waste", harvest: "Record harvest", observe: "Record observation" };

function plantAction() {
  return $("#plant-form").elements.namedItem("action").value;
}

function syncPlantForm() {
  const action = plantAction();
  for (const node of $$("#plant-form [data-actions]")) {
    node.hidden = !node.dataset.actions.split(" ").includes(action);
  }
  $("#pf-submit").textContent = ACTION_VERBS[action];
}

function splitTags(text) {
  return text.split(/[\s,;]+/).map((t) => t.trim().toUpperCase()).filter(Boolean);
}

function plantFriendly(name, index, message) {
  if (name === "plant_tags" && index !== undefined) {
    const tags = splitTags($("#pf-plant_tags").value);
    const tag = tags[Number(index)];
    return `Tag ${Number(index) + 1}${tag ? ` "${tag}"` : ""} is not a plant tag: it must be 24 letters and digits (${message}).`;
  }
  return message;
}

$("#plant-action").addEventListener("change", () => { syncPlantForm(); clearErrors($("#plant-form")); });

$("#plant-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  clearErrors(form);
  const action = plantAction();
  const value = (name) => form.elements.namedItem(name).value.trim();
  const data = { action, plant_tags: splitTags(value("plant_tags")) };
  if (!data.plant_tags.length) {
    // Checked here only because an empty list cannot name its tag; the API checks the rest.
    showErrors(form, { field: "data.plant_tags", error: "Type or scan at least one plant tag." }, 422);
    return;
  }
  if (action === "move") data.room = value("room");
  if (action === "waste" || action === "harvest") { data.weight = value("weight"); data.unit = value("unit"); }
  if (action === "waste") { data.reason = value("reason"); if (value("method")) data.method = value("method"); }
  if (value("note")) data.note = value("note");
  for (const key of Object.keys(data)) if (data[key] === "") data[key] = null;
  const button = $("#pf-submit");
  button.disabled = true;
  const answer = await api("POST", "/v1/events/plant", { data });
  button.disabled = false;
  const result = $("#pf-result");
  if (answer.status === 202) {
    result.className = "result ok";
    result.replaceChildren("✔ Recorded. Event ", el("span", { class: "seq", id: "pf-seq", text: `seq ${answer.body.seq}` }),
      ` · ${action} of ${data.plant_tags.length} plant${data.plant_tags.length === 1 ? "" : "s"}`);
    result.hidden = false;
    addRecentPlant(data, answer.body);
    form.elements.namedItem("plant_tags").value = "";
    form.elements.namedItem("note").value = "";
  } else {
    result.className = "result bad";
    result.textContent = answer.status === 422 ? "✖ Not recorded: fix the marked field." : `✖ Not recorded: ${(answer.body && answer.body.error) || answer.status}`;
    result.hidden = false;
    showErrors(form, answer.body, answer.status, plantFriendly);
  }
});

function addRecentPlant(data, accepted) {
  const list = $("#plant-recent");
  if (list.firstElementChild && list.firstElementChild.classList.contains("muted")) list.replaceChildren();
  list.prepend(el("li", {},
    el("span", { class: "badge ok", text: `seq ${accepted.seq}` }),
    el("span", { class: "name", text: data.action }),
    el("span", { text: data.plant_tags.join(" ") }),
    data.room ? el("span", { class: "muted", text: `→ ${data.room}` }) : null,
    data.weight ? el("span", { class: "muted", text: `${data.weight} ${data.unit}` }) : null,
    el("span", { class: "muted", text: new Date().toLocaleTimeString() })));
  while (list.children.length > 8) list.lastElementChild.remove();
}

$("#pf-use-scan").addEventListener("click", () => {
  if (!state.lastScan) return;
  const input = $("#pf-plant_tags");
  const tags = splitTags(input.value);
  if (!tags.includes(state.lastScan)) tags.push(state.lastScan);
  input.value = tags.join(" ");
});

// -- scans (WebSocket) -------------------------------------------------------------------

function connectScans() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  let ws;
  try { ws = new WebSocket(`${scheme}://${location.host}/v1/scans`); } catch (err) { return; }
  state.ws = ws;
  const badge = $("#scan-conn");
  ws.onopen = () => { state.wsRetry = 1000; badge.textContent = "live"; badge.className = "badge ok"; };
  ws.onmessage = (event) => {
    let scan;
    try { scan = JSON.parse(event.data); } catch (err) { return; }
    addScan(scan);
  };
  ws.onclose = () => {
    badge.textContent = "reconnecting"; badge.className = "badge warn";
    state.ws = null;
    if (!state.features.scans || $("#app").hidden) return;
    setTimeout(() => { if (!state.ws && state.features.scans) connectScans(); }, state.wsRetry);
    state.wsRetry = Math.min(state.wsRetry * 2, 15000);
  };
}

// A message is the scan event's envelope: {"seq", "ts", "source", "data": {code, package_tag, known, ...}}.
function addScan(message) {
  const data = message.data && typeof message.data === "object" ? message.data : message;
  const tag = data.package_tag || null;
  const list = $("#scans");
  const empty = $(".empty", list);
  if (empty) empty.remove();
  let mark;
  if (data.valid === false) mark = el("span", { class: "badge bad", text: "unreadable" });
  else if (data.known === true) mark = el("span", { class: "badge ok", text: "✔ known package" });
  else if (data.known === false) mark = el("span", { class: "badge bad", text: "✖ unknown package" });
  else mark = el("span", { class: "badge", text: tag ? "package" : (data.classification || "scan") });
  const meta = [data.device || message.source, data.symbology, data.classification,
                data.valid === false ? data.reason : null,
                message.seq ? `#${message.seq}` : null,
                clockTime(message.ts || data.ts || new Date().toISOString())].filter(Boolean).join(" · ");
  const item = el("li", { class: "fresh", "data-known": String(data.known) }, mark,
                  el("span", { class: "code", text: tag || data.code || "" }),
                  el("span", {}), el("span", { class: "meta", text: meta }));
  list.prepend(item);
  while (list.children.length > 50) list.lastElementChild.remove();
  if (tag) {
    state.lastScan = tag;
    state.recentPackages = [tag, ...state.recentPackages.filter((t) => t !== tag)].slice(0, 6);
    renderRecentPackages();
  }
}

// -- rooms ---------------------------------------------------------------------------------

const QUANTITIES = [
  { key: "temperature_c", label: "Temperature", unit: "°C", digits: 1 },
  { key: "rh_pct", label: "RH", unit: "%", digits: 0 },
  { key: "vpd_kpa", label: "VPD", unit: "kPa", digits: 2 },
  { key: "co2_ppm", label: "CO₂", unit: "ppm", digits: 0 },
];

function startRooms() {
  if (state.roomsTimer || !state.features.rooms) return;
  loadRooms();
  state.roomsTimer = setInterval(loadRooms, 10000);
}

function stopRooms() {
  if (state.roomsTimer) clearInterval(state.roomsTimer);
  state.roomsTimer = null;
}

async function loadRoomNames() {
  const answer = await api("GET", "/v1/rooms");
  if (!answer.ok) return;
  const rooms = answer.body.rooms || [];
  $("#room-list").replaceChildren(...rooms.map((r) => el("option", { value: r.name })));
  state.roomAlarms = rooms.flatMap((r) => (r.alarms || []).map((a) => ({ room: r.name, ...a })));
}

async function loadRooms() {
  const answer = await api("GET", "/v1/rooms");
  const box = $("#rooms");
  if (!answer.ok) {
    box.replaceChildren(el("p", { class: "card muted", text: `Rooms unavailable: ${(answer.body && answer.body.error) || answer.status}` }));
    return;
  }
  const rooms = answer.body.rooms || [];
  state.roomAlarms = rooms.flatMap((r) => (r.alarms || []).map((a) => ({ room: r.name, ...a })));
  if (!rooms.length) {
    box.replaceChildren(el("p", { class: "card muted", text: "No sensors configured: add [[devices]] of type sensor and [[rooms]] to the agent's config." }));
    return;
  }
  const cards = [];
  for (const room of rooms) {
    const readings = QUANTITIES.map((q) => readingTile(q, room));
    const histories = await Promise.all((room.sensors || []).map(loadHistory));
    const charts = QUANTITIES.map((q) => chart(q, histories, room));
    cards.push(el("article", { class: "card room" },
      el("h3", {}, room.name, el("span", { class: "badge", text: room.stage }),
         el("span", { class: `badge ${room.lights === "on" ? "warn" : ""}`, text: `lights ${room.lights}` }),
         (room.alarms || []).length ? el("span", { class: "badge bad", text: `${room.alarms.length} alarm${room.alarms.length > 1 ? "s" : ""}` }) : null),
      el("div", { class: "readings" }, readings),
      el("div", { class: "charts" }, charts)));
  }
  box.replaceChildren(...cards);
}

function bandOf(room, key) {
  const b = room.bands && room.bands[key];
  return b ? (b.now || b.on || null) : null;
}

function readingTile(q, room) {
  const value = room.values ? room.values[q.key] : null;
  const band = bandOf(room, q.key);
  let level = "";
  if (value !== null && value !== undefined && band) {
    level = band.low !== null && value < band.low ? "low" : band.high !== null && value > band.high ? "high" : "ok";
  }
  const where = { low: "▼ below target", high: "▲ above target", ok: "✔ in band", "": "" }[level];
  const bandText = band ? `target ${band.low ?? "…"}–${band.high ?? "…"} ${q.unit}` : "no target band";
  return el("div", { class: `reading ${level}` },
    el("div", { class: "q", text: q.label }),
    el("div", { class: "v", text: value === null || value === undefined ? "—" : `${Number(value).toFixed(q.digits)} ${q.unit}` }),
    el("div", { class: "band", text: [where, bandText].filter(Boolean).join(" · ") }));
}

async function loadHistory(device) {
  const cached = state.history[device];
  if (cached && Date.now() - cached.at < 60000) return cached.points;
  if (!state.features.history) return [];
  const answer = await api("GET", `/v1/sensors/${encodeURIComponent(device)}/history?hours=24`);
  const points = answer.ok ? (answer.body.points || []) : [];
  state.history[device] = { at: Date.now(), points };
  return points;
}

// Inline SVG from numbers only (no text from the agent goes into the markup).
function chart(q, histories, room) {
  const W = 300, H = 70, now = Date.now(), span = 24 * 3600 * 1000;
  const series = histories.map((points) => points
    .map((p) => [Date.parse(p.ts), p[q.key] && p[q.key].mean])
    .filter(([t, v]) => !isNaN(t) && typeof v === "number" && isFinite(v)));
  const band = bandOf(room, q.key);
  const values = series.flat().map(([, v]) => v);
  if (band) for (const b of [band.low, band.high]) if (typeof b === "number") values.push(b);
  const wrap = el("div", { class: "chart" },
    el("div", { class: "t" }, el("span", { text: `${q.label}, 24 h` }),
       el("span", { text: values.length ? `${Math.min(...values).toFixed(q.digits)}–${Math.max(...values).toFixed(q.digits)} ${q.unit}` : "no data" })));
  let lo = Math.min(...values), hi = Math.max(...values);
  if (!values.length) { lo = 0; hi = 1; }
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const x = (t) => ((t - (now - span)) / span * (W - 6)).toFixed(1);  // room for the "now" dot
  const y = (v) => (H - (v - lo) / (hi - lo) * H).toFixed(1);
  let svg = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img" aria-label="${q.label} over 24 hours">`;
  if (band && (typeof band.low === "number" || typeof band.high === "number")) {
    const top = typeof band.high === "number" ? y(band.high) : 0;
    const bottom = typeof band.low === "number" ? y(band.low) : H;
    svg += `<rect class="band-area" x="0" y="${top}" width="${W}" height="${Math.max(0, bottom - top).toFixed(1)}"/>`;
  }
  series.forEach((pts, i) => {
    if (!pts.length) return;
    // Break the line where minutes are missing (a sensor offline), not across the gap.
    let d = "", prev = null;
    for (const [t, v] of pts) {
      d += `${prev === null || t - prev > 5 * 60000 ? "M" : "L"}${x(t)},${y(v)} `;
      prev = t;
    }
    svg += `<path class="line s${i % 3}" d="${d.trim()}"/>`;
    // The newest minute as a dot (a round cap on a zero-length line stays round when stretched).
    const [lt, lv] = pts[pts.length - 1];
    svg += `<path class="dot s${i % 3}" d="M${x(lt)},${y(lv)} l0,0"/>`;
  });
  svg += "</svg>";
  if (!series.some((pts) => pts.length)) {
    wrap.append(el("div", { class: "none", text: "No history yet: minutes appear as they complete" }));
    return wrap;
  }
  const holder = el("div");
  holder.innerHTML = svg;
  wrap.append(holder.firstChild, el("div", { class: "t axis" }, el("span", { text: "24 h ago" }), el("span", { text: "now" })));
  return wrap;
}

// -- labels ----------------------------------------------------------------------------------

function labelPrinters(devices) {
  return devices.filter((d) => d.type === "label_printer");
}

function renderPrinters(devices) {
  const select = $("#lf-printer");
  const printers = labelPrinters(devices);
  const key = printers.map((p) => `${p.id}:${p.state}`).join(",");
  if (select.dataset.key === key) return;
  select.dataset.key = key;
  const chosen = select.value;
  select.replaceChildren(...(printers.length ? printers.map((p) => el("option", { value: p.id, text: `${p.id} (${p.state || "unknown"})` }))
    : [el("option", { value: "", text: "No label printer configured" })]));
  if (printers.some((p) => p.id === chosen)) select.value = chosen;
  $("#lf-print").disabled = printers.length === 0;
}

function renderRecentPackages() {
  $("#lf-recent").replaceChildren(...state.recentPackages.map((tag) =>
    el("button", { type: "button", text: tag, title: "use this scanned package", onclick: () => { $("#lf-package_tag").value = tag; } })));
}

function labelBody() {
  const form = $("#label-form");
  const body = {};
  for (const name of ["package_tag", "product", "net_weight", "unit", "thc_pct", "cbd_pct", "batch", "printer"]) {
    const value = form.elements.namedItem(name).value.trim();
    if (value !== "") body[name] = name === "package_tag" ? value.toUpperCase() : value;
  }
  return body;
}

$("#lf-preview").addEventListener("click", async () => {
  const form = $("#label-form");
  clearErrors(form);
  const button = $("#lf-preview");
  button.disabled = true;
  const answer = await api("POST", "/v1/print/label/preview", labelBody());
  button.disabled = false;
  const box = $("#lf-preview-box");
  if (answer.ok && answer.body instanceof Blob) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(answer.body);
    box.replaceChildren(el("img", { src: state.previewUrl, alt: "label preview", id: "lf-preview-img" }));
  } else {
    box.replaceChildren(el("p", { class: "muted", text: "No preview: fix the marked field." }));
    showErrors(form, answer.body, answer.status);
  }
});

$("#label-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  clearErrors(form);
  const button = $("#lf-print");
  button.disabled = true;
  const answer = await api("POST", "/v1/print/label", labelBody());
  button.disabled = labelPrinters((state.view && state.view.status.devices) || []).length === 0;
  const result = $("#lf-result");
  result.hidden = false;
  if (answer.ok) {
    const b = answer.body || {};
    result.className = "result ok";
    const verb = answer.status === 202 ? "Sent to the printer (it cannot confirm printing)" : "Printed";
    result.textContent = `✔ ${verb}${b.printer ? ` on ${b.printer}` : ""}${b.summary ? `: ${b.summary}` : ""}.`;
  } else {
    result.className = "result bad";
    const fault = answer.body && (answer.body.error || answer.body.fault);
    result.textContent = answer.status === 503 ? `✖ Not printed: ${fault || "printer fault"}` : `✖ Not printed: ${fault || answer.status}`;
    if (answer.status !== 503) showErrors(form, answer.body, answer.status);
  }
});

// -- start -----------------------------------------------------------------------------------

syncPlantForm();
(async () => {
  const who = await api("GET", "/v1/session");
  if (who.ok) showApp(who.body.name); else showSignIn("");
})();
