// edge-agent HQ page. Plain JavaScript, nothing from the internet. The fleet
// comes from GET /v1/fleet (already sorted by risk), a site from
// GET /v1/sites/{id}, refreshed every 5 s with the session cookie. Text from
// the server is always set with textContent, never as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const REFRESH_MS = 5000;
const STATUS_BADGE = { online: "ok", silent: "warn", offline: "bad", "never-seen": "bad" };
let timer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") Object.assign(node.style, value);  // CSSOM: allowed by the CSP
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

function since(iso) {
  const t = Date.parse(iso);
  return isNaN(t) ? null : (Date.now() - t) / 1000;
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
    return { ok: false, status: 0, body: { error: "HQ did not answer (network); retrying" } };
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (response.status === 401 && path !== "/v1/session") showSignIn("Signed out: sign in again.");
  return { ok: response.ok, status: response.status, body: data };
}

// -- sign-in ------------------------------------------------------------------------------

function showSignIn(message) {
  clearTimeout(timer);
  $("#app").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message || "";
  $("#signin-token").focus();
}

function showApp(name) {
  $("#signin").hidden = true;
  $("#app").hidden = false;
  $("#who").textContent = name ? `Signed in: ${name}` : "";
  refresh();
}

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#signin-token");
  const answer = await api("POST", "/v1/session", { token: input.value.trim() });
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

window.addEventListener("hashchange", () => refresh());

// -- the fleet -------------------------------------------------------------------------------

function problems(site, deadlineH, metrc) {
  const out = [];
  const m = metrc[site.site];
  if (m && m.failed) out.push(`Metrc: ${m.failed} failed (kept for a person)`);
  if (m && m.overdue) out.push(`Metrc: ${m.overdue} overdue (not reported in ${deadlineH} h)`);
  if (site.status === "offline") out.push(`Offline, last seen ${ago(since(site.last_seen))} ago`);
  if (site.status === "never-seen") out.push("Never heard from (registered)");
  if (site.status === "silent") out.push(`Silent: no health for ${ago(since(site.last_seen))}`);
  const sale = site.oldest_unsent_s.sale;
  if (sale) out.push(`Oldest unsent sale ${ago(sale)} of ${deadlineH} h`);
  for (const d of site.devices_down) out.push(`Device down: ${d}`);
  for (const a of site.alarms) out.push(`Alarm: ${a.message || a.code}`);
  return out;
}

function siteCard(site, deadlineH, metrc) {
  const risky = site.status === "online" && (site.deadline_share >= 0.5
    || site.devices_down.length || site.alarms.length);
  const waiting = Object.values(site.backlog).reduce((a, b) => a + b, 0);
  const share = Math.min(1, site.deadline_share || 0);
  const meterClass = share >= 1 ? "meter bad" : share >= 0.5 ? "meter warn" : "meter";
  const list = problems(site, deadlineH, metrc);
  return el("a", { class: `card site-card ${site.status}${risky ? " risk" : ""}`,
                   href: `#site/${encodeURIComponent(site.site)}`, "data-site": site.site },
    el("h3", {}, el("span", { text: site.name }),
       el("span", { class: `badge ${STATUS_BADGE[site.status] || ""}`, text: site.status })),
    el("p", { class: "muted id line" },
       `${site.site}${site.state ? " · " + site.state : ""}${site.version ? " · v" + site.version : ""}`),
    el("p", { class: "line" }, `${waiting} event(s) waiting · last seen `,
       el("strong", { text: site.last_seen ? `${ago(since(site.last_seen))} ago` : "never" })),
    el("div", { class: meterClass, title: "oldest unsent sale against the deadline" },
       el("span", { style: { width: `${Math.round(share * 100)}%` } })),
    list.length ? el("ul", { class: "problems" }, list.map((p) => el("li", { text: p })))
                : el("p", { class: "line ok-line muted", text: "Nothing to do" }));
}

async function showFleet() {
  $("#view-site").hidden = true;
  $("#view-fleet").hidden = false;
  const answer = await api("GET", "/v1/fleet");
  if (!answer.ok) return failed(answer);
  const fleet = answer.body;
  const s = fleet.summary;
  const total = fleet.sites.length;
  $("#fleet-pill").textContent = fleet.all_online ? "All online" : `${s.online} of ${total} online`;
  $("#fleet-pill").className = `pill ${fleet.all_online ? "healthy" : "degraded"}`;
  $("#fleet-summary").textContent =
    `${s.online} online · ${s.offline} offline · ${s.silent} silent · ${s["never-seen"]} never seen`;
  $("#deadline-h").textContent = String(fleet.report_within_h);
  $("#generated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  const metrc = {};
  const m = await api("GET", "/v1/metrc");
  if (m.ok) for (const row of m.body.days) {
    const t = (metrc[row.site] = metrc[row.site] || { failed: 0, overdue: 0 });
    t.failed += row.failed.length;
    t.overdue += row.overdue;
  }
  $("#fleet").replaceChildren(...fleet.sites.map((site) => siteCard(site, fleet.report_within_h, metrc)));
}

// -- one site --------------------------------------------------------------------------------

function fact(dt, dd) { return [el("dt", { text: dt }), el("dd", { text: dd })]; }

function faultChart(faults) {
  const byDevice = {};
  for (const row of faults.rows) (byDevice[row.device] = byDevice[row.device] || {})[row.hour] = row.faults;
  const devices = Object.keys(byDevice);
  if (!devices.length) return el("p", { class: "muted", text: `No printer faults in the last ${faults.hours} h.` });
  const now = Date.now();
  const hours = [];
  for (let i = faults.hours - 1; i >= 0; i--) {
    const t = new Date(now - i * 3600e3);
    hours.push(t.toISOString().slice(0, 13) + ":00Z");
  }
  return el("div", { class: "faults" }, devices.map((device) => {
    const counts = hours.map((h) => byDevice[device][h] || 0);
    const top = Math.max(1, ...counts);
    const total = counts.reduce((a, b) => a + b, 0);
    return [el("strong", { text: device }),
            el("div", { class: "bars", "aria-label": `${device}: ${total} faults` },
               counts.map((n, i) => el("span", { class: n ? "" : "zero", title: `${hours[i]}: ${n}`,
                                                  style: { height: `${Math.max(2, (n / top) * 100)}%` } }))),
            el("span", { text: `${total}` })];
  }));
}

async function showSite(id) {
  $("#view-fleet").hidden = true;
  $("#view-site").hidden = false;
  const answer = await api("GET", `/v1/sites/${encodeURIComponent(id)}`);
  if (!answer.ok) return failed(answer);
  const site = answer.body;
  $("#h-site").replaceChildren(el("span", { text: site.name }),
    el("span", { class: `badge ${STATUS_BADGE[site.status] || ""}`, text: site.status }));
  $("#site-facts").replaceChildren(...[
    fact("Site", site.site), fact("State", site.state || "—"),
    fact("License", site.license_number || "—"), fact("Time zone", site.timezone),
    fact("Last seen", site.last_seen ? `${ago(since(site.last_seen))} ago` : "never"),
    fact("Version", site.version || "—"), fact("Health", site.health || "—"),
  ].flat());
  $("#site-reasons").replaceChildren(...site.reasons.map((r) => el("li", { text: r })));
  $("#site-devices").replaceChildren(...(site.devices.length ? site.devices.map((d) =>
    el("li", {}, el("span", { class: "name", text: d.id }),
       el("span", { class: `badge ${d.state === "up" ? "ok" : ["down", "error", "offline", "fault"].includes(d.state) ? "bad" : "warn"}`, text: d.state || "?" }),
       d.last_fault ? el("span", { class: "fault", text: `last fault: ${d.last_fault}` }) : null))
    : [el("li", { class: "muted", text: "No devices reported." })]));
  $("#site-kinds").replaceChildren(...site.kinds.map((k) => el("tr", {},
    el("td", { text: k.kind }), el("td", { class: "num", text: String(k.received) }),
    el("td", { class: "num", text: `${k.first_seq}–${k.last_seq}` }),
    el("td", { class: "num", text: String(k.acked_upto ?? "—") }),
    el("td", { text: k.gaps.length ? k.gaps.map(([a, b]) => a === b ? `${a}` : `${a}–${b}`).join(", ") : "none" }),
    el("td", { class: "num", text: String(Array.isArray(k.conflicts) ? k.conflicts.length : (k.conflicts ?? 0)) }),
    el("td", { class: "num", text: String(k.rejected ?? 0) }),
    el("td", { class: "num", text: String(site.backlog[k.kind] ?? 0) }),
    el("td", { text: k.newest_age_s === undefined ? "—" : `${ago(k.newest_age_s)} ago` }))));
  await showMetrc(site.site);
  $("#fault-window").textContent = `(last ${site.faults.hours} h)`;
  $("#site-faults").replaceChildren(faultChart(site.faults));
  $("#generated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function showMetrc(id) {
  const answer = await api("GET", `/v1/metrc?site=${encodeURIComponent(id)}`);
  const body = $("#site-metrc");
  const list = $("#site-metrc-failed");
  if (!answer.ok || !answer.body.enabled) {
    $("#metrc-note").textContent = answer.ok ? "(reporting to Metrc is off: [metrc] enabled)" : "";
    body.replaceChildren();
    list.replaceChildren();
    return;
  }
  $("#metrc-note").textContent = "(the site's local days, last 7)";
  const days = answer.body.days;
  body.replaceChildren(...(days.length ? days.map((d) => el("tr", { "data-day": d.day },
    el("td", { text: d.day }), el("td", { class: "num", text: String(d.at_hq) }),
    el("td", { class: "num", text: String(d.reported) }),
    el("td", { class: "num", text: String(d.pending) }),
    el("td", { class: `num${d.failed.length ? " bad-text" : ""}`, text: String(d.failed.length) }),
    el("td", { class: `num${d.overdue ? " bad-text" : ""}`, text: String(d.overdue) })))
    : [el("tr", {}, el("td", { colspan: "6", class: "muted", text: "No sales for Metrc yet." }))]));
  list.replaceChildren(...days.flatMap((d) => d.failed.map((f) => el("li", {},
    el("strong", { text: `${f.receipt_number || f.event_id} (${d.day}, ${f.attempts} attempt(s)): ` }),
    el("span", { text: f.error || "" })))));
}

function failed(answer) {
  const banner = $("#error-banner");
  banner.hidden = false;
  banner.textContent = (answer.body && answer.body.error) || `HQ answered ${answer.status}`;
}

async function refresh() {
  clearTimeout(timer);
  $("#error-banner").hidden = true;
  const hash = decodeURIComponent(location.hash.replace(/^#/, ""));
  if (hash.startsWith("site/")) await showSite(hash.slice(5));
  else await showFleet();
  $("#live").classList.add("on");
  if (!$("#app").hidden) timer = setTimeout(refresh, REFRESH_MS);
}

(async () => {
  const answer = await api("GET", "/v1/session");
  if (answer.ok) showApp(answer.body.name);
  else showSignIn("");
})();
