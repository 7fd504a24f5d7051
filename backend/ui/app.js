// The IMN dashboard: fleet, agent, rollout, measurement and request pages, over the REST API
// and its Server-Sent Events (a measurement's heat map, loss and paths are in views.js).
// Plain JavaScript served by the backend: no build step, no CDN, no internet.
"use strict";

const state = { token: localStorage.getItem("imn-token") || "", timers: [], streams: [], page: 0 };
const view = document.getElementById("view");

// ---- helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function banner(text) {
  const b = document.getElementById("banner");
  b.textContent = text || "";
  b.hidden = !text;
}

function fmtAgo(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

function fmtDur(s) {
  if (s == null) return "-";
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function fmtTs(iso) {
  return iso ? new Date(iso).toLocaleString() : "-";
}

function headers(extra) {
  const hd = Object.assign({}, extra || {});
  if (state.token) hd.Authorization = "Bearer " + state.token;
  return hd;
}

async function api(path, opts) {
  opts = opts || {};
  const hd = headers(opts.body !== undefined ? { "Content-Type": "application/json" } : {});
  const r = await fetch(path, { method: opts.method || "GET", headers: hd, body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined });
  const text = await r.text();
  let body;
  try { body = JSON.parse(text); } catch (_) { body = text; }
  if (r.status === 401) banner("This backend runs with auth: enter an API token above (read scope to watch, measure scope to run measurements).");
  if (!r.ok) {
    const e = new Error((body && body.message) || `${r.status} ${r.statusText}`);
    e.status = r.status;
    e.body = body;
    throw e;
  }
  return body;
}

// Server-Sent Events over fetch (EventSource cannot send a token). Resumes after the
// last event id when the connection drops, so nothing is missed or repeated.
function stream(path, onEvent) {
  const ctl = { stopped: false, abort: null, lastId: null };
  (async () => {
    while (!ctl.stopped) {
      const ac = new AbortController();
      ctl.abort = ac;
      try {
        const r = await fetch(path, { headers: headers(ctl.lastId ? { "Last-Event-ID": ctl.lastId } : {}), signal: ac.signal });
        if (!r.ok) throw new Error(`${r.status}`);
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "", data = "", id = null;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let nl;
          while ((nl = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, nl).replace(/\r$/, "");
            buf = buf.slice(nl + 1);
            if (line === "") {
              if (data) {
                try { onEvent(JSON.parse(data)); } catch (_) { /* not a result */ }
                if (id) ctl.lastId = id;
              }
              data = ""; id = null;
            } else if (line.startsWith("id:")) id = line.slice(3).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trimStart();
          }
        }
      } catch (_) { /* dropped or stopped: retry below */ }
      if (!ctl.stopped) await new Promise((res) => setTimeout(res, 1000));
    }
  })();
  const handle = { stop() { ctl.stopped = true; if (ctl.abort) ctl.abort.abort(); } };
  state.streams.push(handle);
  return handle;
}

function every(ms, fn) {
  const page = state.page;
  const run = () => { if (page === state.page) fn().catch((e) => banner(e.message)); };
  run();
  state.timers.push(setInterval(run, ms));
}

function table(headersRow, rows, attrs) {
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, headersRow.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows));
}

// The backend gives each result its module's one-line summary (the same the CLI
// prints); a result it could not summarize shows its raw JSON.
function summarize(r) {
  if (r.error) return r.error;
  if (typeof r.summary === "string") return r.summary;
  return JSON.stringify(r.result === undefined ? null : r.result);
}

function stateCell(s) {
  return h("td", { class: s }, s);
}

// Milliseconds since the epoch (as the lifecycle API gives times) as an ISO string.
function isoOf(ms) {
  return ms ? new Date(ms).toISOString() : null;
}

// Update phases worth showing in a list: the agent is moving to a release.
const ACTIVE_PHASES = ["downloading", "staged", "trial"];

// What an agent's last update or settings change failed with, as a small badge whose
// title is the whole text (`update_refused: …` reads "update refused").
function failureBadge(failure) {
  if (!failure) return null;
  const kind = /^([a-z_]+):/.exec(failure);
  const label = kind && /^(update|settings)_/.test(kind[1]) ? kind[1].replace(/_/g, " ") : "update failed";
  return h("span", { class: "badge update-failed", title: failure }, label);
}

function phaseBadge(phase) {
  return ACTIVE_PHASES.includes(phase) ? h("span", { class: `badge phase ${phase}`, title: `update phase: ${phase}` }, phase) : null;
}

// ---- fleet map -----------------------------------------------------------------

// Equirectangular: longitude -180..180 to x 0..720, latitude 90..-90 to y 0..360.
const MAP_W = 720, MAP_H = 360;
const MAP_R = 4;
function mapX(lon) { return (lon + 180) * (MAP_W / 360); }
function mapY(lat) { return (90 - lat) * (MAP_H / 180); }

// The land outline (world.js) as one path, built the first time a map is drawn.
let worldPath = null;
function worldOutline() {
  if (worldPath !== null) return worldPath;
  const parts = [];
  for (const ring of typeof WORLD_LAND === "undefined" ? [] : WORLD_LAND) {
    let d = "";
    for (let i = 0; i + 1 < ring.length; i += 2) {
      d += `${i ? "L" : "M"}${+mapX(ring[i] / 10).toFixed(1)} ${+mapY(ring[i + 1] / 10).toFixed(1)}`;
    }
    if (d) parts.push(d + "Z");
  }
  worldPath = parts.join("");
  return worldPath;
}

// An agent's coordinates, or null. They come from the agent: anything but two finite
// numbers in range is no location.
function agentCoords(a) {
  const loc = a && a.location;
  if (!loc || typeof loc !== "object") return null;
  const lat = loc.latitude, lon = loc.longitude;
  if (typeof lat !== "number" || typeof lon !== "number" || !Number.isFinite(lat) || !Number.isFinite(lon)) return null;
  if (lat < -90 || lat > 90 || lon < -180 || lon > 180) return null;
  return { lat, lon };
}

function coordsText(a) {
  const c = agentCoords(a);
  return c ? `${c.lat.toFixed(2)}, ${c.lon.toFixed(2)}` : "";
}

// The map of the agents with a location: a dot each, green alive, red not, that links
// to the agent's page. Dots that would overlap (agents at the same place) are spread
// on a small spiral around the first, with a badge counting them.
function fleetMap() {
  const markers = svgEl("g", { class: "markers" });
  let graticule = "";
  for (let lon = -150; lon <= 150; lon += 30) graticule += `M${mapX(lon)} 0V${MAP_H}`;
  for (let lat = -60; lat <= 60; lat += 30) graticule += `M0 ${mapY(lat)}H${MAP_W}`;
  const svg = svgEl("svg", { id: "fleet-map", class: "fleet-map", viewBox: `0 0 ${MAP_W} ${MAP_H}`, role: "img", "aria-label": "map of the agents' locations" });
  svg.append(svgEl("rect", { class: "sea", x: 0, y: 0, width: MAP_W, height: MAP_H }),
    svgEl("path", { class: "graticule", d: graticule }),
    svgEl("path", { class: "land", d: worldOutline() }),
    markers);
  const caption = h("span", { id: "fleet-map-caption" });
  const el = h("div", { class: "map-box" }, svg,
    h("div", { class: "map-caption" }, caption,
      h("span", { class: "legend" }, h("i", { class: "dot alive" }), "alive", h("i", { class: "dot offline" }), "offline")));
  const update = (list, filtered) => {
    const placed = [];
    for (const a of list) {
      const c = agentCoords(a);
      if (c) placed.push({ a, lat: c.lat, lon: c.lon, x: mapX(c.lon), y: mapY(c.lat) });
    }
    placed.sort((p, q) => (p.a.id < q.a.id ? -1 : p.a.id > q.a.id ? 1 : 0));
    // Clusters of dots closer than a dot's radius, found through a grid of that size.
    const cell = MAP_R, grid = new Map(), clusters = [];
    for (const p of placed) {
      const gx = Math.floor(p.x / cell), gy = Math.floor(p.y / cell);
      let home = null;
      for (let dx = -1; dx <= 1 && !home; dx++) {
        for (let dy = -1; dy <= 1 && !home; dy++) {
          for (const c of grid.get(`${gx + dx},${gy + dy}`) || []) {
            if (Math.hypot(c.x - p.x, c.y - p.y) < MAP_R) { home = c; break; }
          }
        }
      }
      if (!home) {
        home = { x: p.x, y: p.y, members: [] };
        clusters.push(home);
        const key = `${gx},${gy}`;
        if (!grid.has(key)) grid.set(key, []);
        grid.get(key).push(home);
      }
      home.members.push(p);
    }
    const dots = [], badges = [];
    for (const c of clusters) {
      const n = c.members.length;
      // Vogel's spiral: the first dot on the place itself, the others around it, the
      // spiral no wider than about 40 units however many there are.
      const step = Math.min(MAP_R * 1.9, 40 / Math.sqrt(n));
      c.members.forEach((p, i) => {
        const r = step * Math.sqrt(i), t = i * 2.39996;
        const x = c.x + r * Math.cos(t), y = c.y + r * Math.sin(t);
        const alive = !!p.a.alive;
        const loc = p.a.location;
        const where = [loc.city, loc.country].filter((v) => typeof v === "string" && v).join(", ");
        const dot = svgEl("circle", {
          class: `marker ${alive ? "alive" : "offline"}`, cx: +x.toFixed(2), cy: +y.toFixed(2), r: MAP_R,
          "data-agent": String(p.a.id), "data-lat": String(p.lat), "data-lon": String(p.lon),
        });
        dot.appendChild(svgEl("title", {}, `${p.a.id} (${alive ? "alive" : "offline"})${where ? ` ${where}` : ""}`));
        const link = svgEl("a", { href: `#/agent/${encodeURIComponent(p.a.id)}`, class: "marker-link" });
        link.appendChild(dot);
        dots.push([alive, link]);
      });
      if (n > 1) {
        const r = step * Math.sqrt(n - 1) + MAP_R;
        badges.push(svgEl("text", { class: "count", x: +(c.x + r * 0.75).toFixed(2), y: +(c.y - r * 0.75).toFixed(2) }, String(n)));
      }
    }
    // The agents that are not alive on top: what needs looking at stays visible.
    markers.replaceChildren(...dots.filter((d) => d[0]).map((d) => d[1]), ...dots.filter((d) => !d[0]).map((d) => d[1]), ...badges);
    caption.textContent = `${placed.length} of ${list.length} ${filtered ? "listed " : ""}agents have a location`;
  };
  return { el, update };
}

// ---- fleet ---------------------------------------------------------------------

async function fleetPage() {
  const alive = h("div", { class: "n", id: "count-alive" }, "–");
  const offline = h("div", { class: "n", id: "count-offline" }, "–");
  const never = h("div", { class: "n", id: "count-never" }, "–");
  const firing = h("div", { class: "n", id: "alerts-firing" }, "–");
  every(5000, async () => { firing.textContent = String((await api("/v1/alert-rules")).firing); });
  const filter = h("input", { id: "filter", placeholder: "filter: id, tag, version, arch, country", size: 40 });
  const status = h("select", { id: "status-filter" }, h("option", { value: "" }, "any status"), h("option", { value: "alive" }, "alive"), h("option", { value: "offline" }, "offline"),
    h("option", { value: "updating" }, "updating"), h("option", { value: "update-failed" }, "update failed"));
  const body = h("tbody");
  const map = fleetMap();
  view.replaceChildren(
    h("h1", {}, "Fleet"),
    h("div", { class: "cards" },
      h("div", { class: "card" }, alive, h("div", { class: "l" }, "alive")),
      h("div", { class: "card" }, offline, h("div", { class: "l" }, "offline")),
      h("div", { class: "card" }, never, h("div", { class: "l" }, "enrolled, never seen")),
      h("a", { class: "card", href: "#/alerts" }, firing, h("div", { class: "l" }, "alerts firing"))),
    h("div", { class: "filters" }, filter, status),
    map.el,
    h("table", { id: "agents" },
      h("thead", {}, h("tr", {}, ["status", "agent", "last seen", "version", "config", "arch", "tags", "location", "outbox", "dropped", "uptime"].map((c) => h("th", {}, c)))),
      body));
  let agents = [], uptime = {};
  const render = () => {
    const q = filter.value.trim().toLowerCase();
    const want = status.value;
    const listed = agents.filter((a) => {
      if (want === "updating") { if (!ACTIVE_PHASES.includes(a.update_phase)) return false; }
      else if (want === "update-failed") { if (!a.update_failure) return false; }
      else if (want && (a.alive ? "alive" : "offline") !== want) return false;
      if (!q) return true;
      const loc = a.location || {};
      return [a.id, a.version, a.arch, a.update_phase, loc.country, loc.city, ...(a.tags || [])].some((v) => v && String(v).toLowerCase().includes(q));
    });
    map.update(listed, !!(q || want));
    body.replaceChildren(...listed.map((a) => {
      const loc = a.location || {};
      const up = uptime[a.id];
      return h("tr", { "data-agent": a.id },
        stateCell(a.alive ? "alive" : "offline"),
        h("td", {}, h("a", { href: `#/agent/${encodeURIComponent(a.id)}` }, a.id)),
        h("td", { title: a.last_seen }, fmtAgo(a.last_seen)),
        h("td", { class: "version" }, h("span", { class: "v" }, a.version), phaseBadge(a.update_phase), failureBadge(a.update_failure)),
        h("td", { class: "num config" }, a.config_version != null ? a.config_version : "-"),
        h("td", {}, a.arch),
        h("td", {}, (a.tags || []).join(", ")),
        h("td", {}, [loc.country, loc.city].filter(Boolean).join(" ") || coordsText(a) || "-"),
        h("td", { class: "num" }, a.outbox && a.outbox.depth != null ? a.outbox.depth : "-"),
        h("td", { class: "num" }, a.outbox && a.outbox.dropped != null ? a.outbox.dropped : "-"),
        h("td", { class: "num uptime", title: up && up.pct != null ? `connected ${up.pct.toFixed(2)} % of the last ${fmtDur(up.over)} (since it first connected, at most 24 h)` : "" },
          up == null || up.pct == null ? "-" : `${up.pct.toFixed(1)} % of ${fmtDur(up.over)}`));
    }));
  };
  filter.addEventListener("input", render);
  status.addEventListener("change", render);
  every(5000, async () => {
    // The first page of the fleet by id (1,000 agents; filter by tag or status to
    // narrow it); the counts are the whole fleet's.
    agents = await api("/agents");
    const health = await api("/health");
    alive.textContent = health.agents_alive;
    offline.textContent = health.agents_known - health.agents_alive;
    try {
      const enrolled = await api("/admin/agents");
      // Known only when the whole fleet is on the page.
      if (health.agents_known <= agents.length) {
        never.textContent = enrolled.filter((e) => !e.revoked_at && !agents.some((a) => a.id === e.id)).length;
      } else { never.textContent = "–"; never.title = "the fleet is larger than one page"; }
    } catch (_) { never.textContent = "–"; never.title = "needs an admin token"; }
    render();
    await Promise.all(agents.slice(0, 200).map(async (a) => {
      // The server counts from the agent's first connection when that is later than
      // the window's start: right from the first second.
      try {
        const st = await api(`/agents/${encodeURIComponent(a.id)}/status?window_s=86400`);
        uptime[a.id] = { pct: st.uptime_pct, over: st.observed_s };
      } catch (_) { /* keep */ }
    }));
    render();
  });
}

// ---- agent ---------------------------------------------------------------------

async function agentPage(id) {
  const enc = encodeURIComponent(id);
  const info = h("div");
  const lifecycle = h("div", { id: "agent-lifecycle" });
  const charts = h("div", { class: "charts", id: "heartbeat-charts" });
  const rtt = h("div", { class: "charts", id: "rtt-charts" });
  const results = h("div");
  const history = h("div", { id: "status-history" });
  view.replaceChildren(h("h1", {}, "Agent ", h("span", { class: "mono" }, id)), info,
    h("h2", {}, "Version, settings and update"), lifecycle,
    h("h2", {}, "Heartbeats"), charts, h("h2", {}, "RTT per target (ping_module)"), rtt,
    h("h2", {}, "Recent results"), results, h("h2", {}, "Status history (24 h)"), history);
  every(5000, async () => {
    const a = await api(`/agents/${enc}`);
    const loc = a.location || {};
    info.replaceChildren(table(["status", "last seen", "version", "arch", "tags", "location", "outbox", "dropped", "schedule version"], [h("tr", {},
      stateCell(a.alive ? "alive" : "offline"), h("td", {}, fmtAgo(a.last_seen)), h("td", {}, a.version), h("td", {}, a.arch),
      h("td", {}, (a.tags || []).join(", ")),
      h("td", {}, [loc.country, loc.city, loc.asn ? `AS${loc.asn}` : null].filter(Boolean).join(" ") || "-"),
      h("td", { class: "num" }, a.outbox ? a.outbox.depth : "-"), h("td", { class: "num" }, a.outbox ? a.outbox.dropped : "-"),
      h("td", { class: "num" }, a.schedule_version))]));
    lifecycle.replaceChildren(lifecycleTable(a));
    const hb = await api(`/agents/${enc}/heartbeats`);
    const net = { rx: [], tx: [] };
    for (let i = 1; i < hb.length; i++) {
      const dt = (hb[i].at_ms - hb[i - 1].at_ms) / 1000;
      if (dt <= 0) continue;
      net.rx.push([hb[i].at_ms, Math.max(0, hb[i].rx_bytes - hb[i - 1].rx_bytes) / 1024 / dt]);
      net.tx.push([hb[i].at_ms, Math.max(0, hb[i].tx_bytes - hb[i - 1].tx_bytes) / 1024 / dt]);
    }
    charts.replaceChildren(
      lineChart({ title: "CPU", series: [{ name: "CPU", points: hb.map((p) => [p.at_ms, p.cpu_pct]) }], xTime: true, xLabel: "time", yLabel: "CPU (%)", yUnit: "%" }),
      lineChart({ title: "Memory used", series: [{ name: "used", points: hb.map((p) => [p.at_ms, p.mem_used_kib / 1024]) }], xTime: true, xLabel: "time", yLabel: "memory (MiB)", yUnit: "MiB" }),
      lineChart({ title: "Load", series: [{ name: "load (1 min)", points: hb.map((p) => [p.at_ms, p.load1]) }], xTime: true, xLabel: "time", yLabel: "load average (1 min)", yUnit: "" }),
      lineChart({ title: "Network", series: [{ name: "received", points: net.rx }, { name: "sent", points: net.tx }], xTime: true, xLabel: "time", yLabel: "KiB/s", yUnit: "KiB/s" }));
    const rs = await api(`/agents/${enc}/results?limit=200`);
    const byTarget = {};
    for (const r of rs.slice().reverse()) {
      for (const t of (r.result && r.result.targets) || []) {
        (byTarget[t.addr || t.host] = byTarget[t.addr || t.host] || []).push([Date.parse(r.finished_at), t.avg_ms]);
      }
    }
    rtt.replaceChildren(...Object.entries(byTarget).map(([target, points]) =>
      lineChart({ title: target, series: [{ name: `avg RTT to ${target}`, points }], xTime: true, xLabel: "time", yLabel: "RTT (ms)", yUnit: "ms" })));
    if (!rtt.children.length) rtt.append(h("p", { class: "muted" }, "no ping results yet"));
    results.replaceChildren(table(["finished", "module", "state", "result", "request"], rs.slice(0, 25).map((r) => h("tr", {},
      h("td", {}, fmtTs(r.finished_at)), h("td", {}, r.module), stateCell(r.state), h("td", {}, summarize(r)),
      h("td", {}, h("a", { href: `#/request/${encodeURIComponent(r.request_id)}`, class: "mono" }, r.request_id.slice(0, 8)))))));
    const st = await api(`/agents/${enc}/status?window_s=86400`);
    const from = Date.now() - 86400 * 1000;
    const bar = h("div", { class: "timeline", title: "last 24 h" });
    for (const iv of st.intervals) {
      const a0 = Math.max(from, Date.parse(iv.from));
      const a1 = iv.until ? Date.parse(iv.until) : Date.now();
      if (a1 <= a0) continue;
      bar.append(h("div", { class: iv.status === "connected" ? "up" : "down", style: `width:${((a1 - a0) / (86400 * 10)).toFixed(3)}%`, title: `${iv.status} ${fmtTs(iv.from)} – ${iv.until ? fmtTs(iv.until) : "now"}` }));
    }
    history.replaceChildren(
      h("p", {}, `Status: ${st.status} since ${fmtTs(st.status_since)}; first connected ${fmtTs(st.first_connected)}; last connected ${fmtTs(st.last_connected)}; uptime ${st.uptime_pct == null ? "-" : st.uptime_pct.toFixed(2) + " %"} over the last ${fmtDur(st.observed_s)}${st.observed_s < st.window_s ? " (since it first connected)" : ""}.`),
      bar,
      table(["status", "from", "until"], st.intervals.slice(-20).reverse().map((iv) => h("tr", {}, stateCell(iv.status === "connected" ? "online" : "offline"), h("td", {}, fmtTs(iv.from)), h("td", {}, iv.until ? fmtTs(iv.until) : "now")))));
  });
}

// What `GET /agents/{id}` says of the agent's lifecycle: the version it runs, the
// settings version it runs and the one it should, and where its update stands.
function lifecycleTable(a) {
  const u = a.update || {};
  const cfg = a.config_version != null ? a.config_version : "-";
  const desired = a.desired_config_version != null ? a.desired_config_version : "-";
  const behind = a.config_version != null && a.desired_config_version != null && a.config_version < a.desired_config_version;
  const progress = u.size ? `${u.downloaded || 0} of ${u.size} bytes (${(100 * (u.downloaded || 0) / u.size).toFixed(0)} %)` : (u.downloaded ? `${u.downloaded} bytes` : "-");
  return table(["version", "config", "desired config", "update phase", "target", "downloaded", "last failure", "failed version"], [h("tr", {},
    h("td", { class: "version" }, a.version),
    h("td", { class: "num config" }, cfg),
    h("td", { class: behind ? "num desired-config pending" : "num desired-config", title: behind ? "not applied yet" : null }, desired),
    h("td", { class: `phase ${ACTIVE_PHASES.includes(u.phase) ? "pending" : ""}` }, a.update ? (u.phase || "-") : "not reported"),
    h("td", {}, u.target || "-"),
    h("td", { class: "num" }, progress),
    h("td", { class: u.last_failure ? "failure failed" : "failure" }, u.last_failure || "-"),
    h("td", {}, u.failed_version || "-"))], { class: "lifecycle" });
}

// ---- rollouts --------------------------------------------------------------------

const ROLLOUT_AGENT_ORDER = ["failed", "downloading", "installing", "offered", "waiting", "healthy", "skipped"];

function rolloutLink(id) {
  return h("a", { href: `#/rollout/${encodeURIComponent(id)}`, class: "mono" }, id);
}

function count(r, k) {
  const c = (r.counts || {})[k];
  return c == null ? 0 : c;
}

async function rolloutsPage() {
  const body = h("tbody");
  view.replaceChildren(h("h1", {}, "Rollouts"),
    h("p", { class: "muted" }, "Releases offered to the fleet wave by wave; start one with ", h("code", {}, "imn rollout start"), "."),
    h("table", { id: "rollouts" },
      h("thead", {}, h("tr", {}, ["rollout", "version", "state", "wave", "agents", "healthy", "failed", "pending", "started"].map((c) => h("th", {}, c)))),
      body));
  every(3000, async () => {
    const rs = (await api("/rollouts")).rollouts || [];
    if (!rs.length) {
      body.replaceChildren(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "no rollouts yet")));
      return;
    }
    body.replaceChildren(...rs.map((r) => h("tr", { "data-rollout": r.id },
      h("td", {}, rolloutLink(r.id)),
      h("td", {}, r.version),
      h("td", { class: r.state, title: r.reason || null }, r.state),
      h("td", { class: "num", title: `current wave ${r.current_wave} (numbered from 0) of ${r.wave_count} waves` }, `${r.current_wave}/${r.wave_count}`),
      h("td", { class: "num" }, (r.agents || []).length),
      h("td", { class: "num healthy-count" }, count(r, "healthy")),
      h("td", { class: count(r, "failed") ? "num failed-count failed" : "num failed-count" }, count(r, "failed")),
      h("td", { class: "num pending-count" }, count(r, "pending")),
      h("td", { title: isoOf(r.created_ms) }, fmtAgo(isoOf(r.created_ms))))));
  });
}

// The share of the agents each wave reaches (cumulative), and how many agents that is,
// worked out as the backend did when the rollout started, over the agents that can
// take the release (skipped ones are in no wave): the canary (at least one agent),
// then each later wave, dropping a wave that would reach no further agent. None when
// that does not give the rollout's number of waves.
function wavePlan(r) {
  const n = (r.agents || []).filter((a) => a.state !== "skipped").length;
  const reach = (p) => Math.ceil(n * p / 100);
  const plan = [];
  if (r.canary_pct > 0) plan.push({ pct: r.canary_pct, upto: Math.min(Math.max(reach(r.canary_pct), 1), n) });
  for (const w of r.waves || []) {
    const upto = Math.min(reach(w), n);
    if (!plan.length || upto > plan[plan.length - 1].upto) plan.push({ pct: w, upto });
  }
  return plan.length === r.wave_count ? plan : null;
}

async function rolloutPage(id) {
  const enc = encodeURIComponent(id);
  const head = h("div", { id: "rollout-head" });
  const waves = h("div", { id: "rollout-waves" });
  const show = h("select", { id: "rollout-agent-filter" }, h("option", { value: "" }, "every agent"),
    h("option", { value: "failed" }, "failed"), h("option", { value: "pending" }, "in progress or waiting"), h("option", { value: "healthy" }, "healthy"));
  const body = h("tbody");
  view.replaceChildren(h("h1", {}, "Rollout ", h("span", { class: "mono", id: "rollout-id" }, id)), head,
    h("h2", {}, "Waves"), waves,
    h("h2", {}, "Agents"), h("div", { class: "filters" }, "show ", show),
    h("table", { id: "rollout-agents" },
      h("thead", {}, h("tr", {}, ["wave", "agent", "state", "version", "detail", "updated"].map((c) => h("th", {}, c)))),
      body));
  let r = null;
  const render = () => {
    if (!r) return;
    const want = show.value;
    const agents = (r.agents || []).filter((a) => !want
      || (want === "pending" ? !["healthy", "failed", "skipped"].includes(a.state) : a.state === want));
    const order = (s) => { const i = ROLLOUT_AGENT_ORDER.indexOf(s); return i < 0 ? ROLLOUT_AGENT_ORDER.length : i; };
    agents.sort((x, y) => (x.wave - y.wave) || (order(x.state) - order(y.state)) || (x.id < y.id ? -1 : x.id > y.id ? 1 : 0));
    const rows = [];
    let wave = null;
    for (const a of agents) {
      if (a.wave !== wave) {
        wave = a.wave;
        const label = `wave ${wave}${wave === 0 && r.canary_pct > 0 ? " (canary)" : ""}${wave === r.current_wave ? " — current" : ""}`;
        rows.push(h("tr", { class: "group", "data-wave": wave }, h("td", { colspan: 6 }, label)));
      }
      rows.push(h("tr", { "data-agent": a.id, "data-wave": a.wave, class: a.state === "failed" ? "failed-row" : null },
        h("td", { class: "num" }, a.wave),
        h("td", {}, h("a", { href: `#/agent/${encodeURIComponent(a.id)}` }, a.id)),
        stateCell(a.state),
        h("td", {}, a.version),
        h("td", { class: a.state === "failed" ? "detail failed" : "detail" }, a.detail == null ? "" : a.detail),
        h("td", { title: isoOf(a.updated_ms) }, fmtAgo(isoOf(a.updated_ms)))));
    }
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "no agents")));
    body.replaceChildren(...rows);
  };
  show.addEventListener("change", render);
  every(3000, async () => {
    r = await api(`/rollouts/${enc}`);
    head.replaceChildren(
      h("p", {}, "Version ", h("span", { class: "mono", id: "rollout-version" }, r.version),
        ", state ", h("span", { class: r.state, id: "rollout-state" }, r.state),
        `, started ${fmtTs(isoOf(r.created_ms))}; halts when more than ${r.max_failures_pct} % of its agents fail. `,
        h("a", { href: "#/rollouts" }, "All rollouts")),
      r.reason ? h("p", { class: "reason" }, h("strong", {}, "Reason: "), h("span", { id: "rollout-reason" }, r.reason)) : null,
      h("div", { class: "cards" },
        h("div", { class: "card" }, h("div", { class: "n healthy", id: "rollout-healthy" }, count(r, "healthy")), h("div", { class: "l" }, "healthy")),
        h("div", { class: "card" }, h("div", { class: "n failed", id: "rollout-failed" }, count(r, "failed")), h("div", { class: "l" }, "failed")),
        h("div", { class: "card" }, h("div", { class: "n pending", id: "rollout-pending" }, count(r, "pending")), h("div", { class: "l" }, "pending")),
        h("div", { class: "card" }, h("div", { class: "n", id: "rollout-skipped" }, count(r, "skipped")), h("div", { class: "l" }, "skipped"))));
    const plan = wavePlan(r);
    const rows = [];
    for (let w = 0; w < r.wave_count; w++) {
      const in_w = (r.agents || []).filter((a) => a.wave === w);
      const n = (s) => in_w.filter((a) => a.state === s).length;
      const kind = w === 0 && r.canary_pct > 0 ? "canary" : "wave";
      const status = w < r.current_wave ? "done" : w === r.current_wave ? "current" : "next";
      rows.push(h("tr", { "data-wave": w, class: w === r.current_wave ? "current-wave" : null },
        h("td", { class: "num" }, w), h("td", {}, kind),
        h("td", { class: "num reach" }, plan ? `${plan[w].pct} % (${plan[w].upto} of ${(r.agents || []).filter((a) => a.state !== "skipped").length})` : "-"),
        h("td", { class: "num" }, in_w.length),
        h("td", { class: "num" }, n("healthy")),
        h("td", { class: n("failed") ? "num failed" : "num" }, n("failed")),
        h("td", { class: "num" }, in_w.length - n("healthy") - n("failed") - n("skipped")),
        h("td", { class: "num" }, n("skipped")),
        h("td", { class: status === "current" ? `wave-status ${r.state}` : "wave-status" }, status === "current" ? `current (${r.state})` : status)));
    }
    waves.replaceChildren(table(["wave", "kind", "reaches (cumulative)", "agents", "healthy", "failed", "pending", "skipped", "status"], rows));
    render();
  });
}

// ---- measure: a form from the module's JSON Schema ------------------------------

function fieldFor(name, prop, required) {
  const id = `p-${name}`;
  const hint = [prop.description, prop.minimum != null ? `min ${prop.minimum}` : null, prop.maximum != null ? `max ${prop.maximum}` : null, required ? "required" : null].filter(Boolean).join("; ");
  let input;
  const type = Array.isArray(prop.type) ? prop.type.find((t) => t !== "null") : prop.type;
  if (prop.enum) {
    input = h("select", { id, name }, h("option", { value: "" }, "(default)"), prop.enum.map((v) => h("option", { value: JSON.stringify(v) }, String(v))));
  } else if (type === "boolean") {
    input = h("input", { id, name, type: "checkbox", checked: prop.default === true });
    if (prop.default === true) input.dataset.defaultTrue = "1";
  } else if (type === "integer" || type === "number") {
    input = h("input", { id, name, type: "number", step: type === "integer" ? "1" : "any", placeholder: prop.default != null ? `default ${prop.default}` : "" });
  } else {
    input = h("input", { id, name, type: "text", size: 40, placeholder: type === "array" ? "comma-separated" : (prop.default != null ? `default ${prop.default}` : "") });
  }
  input.dataset.type = type || "string";
  if (prop.items && prop.items.type) input.dataset.items = prop.items.type;
  return [h("label", { for: id }, name), h("div", {}, input, h("div", { class: "hint" }, hint), h("div", { class: "field-error", id: `err-${name}` }))];
}

function valueOf(input) {
  const t = input.dataset.type;
  // A box that is on by default sends false when cleared; others send true when set.
  if (t === "boolean") return input.checked ? (input.dataset.defaultTrue ? undefined : true) : (input.dataset.defaultTrue ? false : undefined);
  const v = input.value.trim();
  if (v === "") return undefined;
  if (input.tagName === "SELECT") return JSON.parse(v);
  // Sent as typed: a value the schema refuses comes back as a field error.
  if (t === "integer" || t === "number") return Number(v);
  if (t === "array") return v.split(",").map((x) => x.trim()).filter(Boolean).map((x) => (input.dataset.items === "integer" || input.dataset.items === "number") ? Number(x) : x);
  if (t === "object") { try { return JSON.parse(v); } catch (_) { return v; } }
  return v;
}

async function measurePage() {
  const modules = await api("/modules");
  const select = h("select", { id: "module", name: "module" }, modules.map((m) => h("option", { value: m.name }, m.name)));
  const fields = h("div", { id: "param-fields", style: "display:contents" });
  const formError = h("div", { class: "field-error", id: "form-error" });
  const sel = {
    all: h("input", { id: "sel-all", type: "checkbox", checked: true }),
    ids: h("input", { id: "sel-ids", placeholder: "agent ids, comma-separated", size: 40 }),
    tags: h("input", { id: "sel-tags", placeholder: "tags the agents all have", size: 40 }),
    country: h("input", { id: "sel-country", placeholder: "DE", size: 4 }),
    asn: h("input", { id: "sel-asn", type: "number", size: 8 }),
    limit: h("input", { id: "sel-limit", type: "number", min: 1, size: 6 }),
  };
  const every_s = h("input", { id: "every", type: "number", min: 1, placeholder: "one-off", size: 8 });
  const deadline = h("input", { id: "deadline", type: "number", min: 1, value: 60, size: 8 });
  const render = () => {
    const m = modules.find((x) => x.name === select.value);
    const props = (m && m.schema && m.schema.properties) || {};
    const req = (m && m.schema && m.schema.required) || [];
    fields.replaceChildren(...Object.entries(props).flatMap(([name, prop]) => fieldFor(name, prop, req.includes(name))));
    const host = document.getElementById("p-host");
    if (host && !host.value) host.value = "127.0.0.1";
  };
  select.addEventListener("change", render);
  if (modules.some((m) => m.name === "ping_module")) select.value = "ping_module";
  const form = h("form", { class: "grid", id: "measure-form" },
    h("label", { for: "module" }, "module"), h("div", {}, select, h("div", { class: "hint" }, "parameters below follow the module's JSON Schema")),
    fields,
    h("label", {}, "agents"), h("div", {},
      h("div", {}, h("label", {}, sel.all, " all agents"), " or pick by:"),
      h("div", {}, "ids ", sel.ids), h("div", {}, "tags ", sel.tags),
      h("div", {}, "country ", sel.country, " AS ", sel.asn, " at most ", sel.limit, " agents"),
      h("div", { class: "field-error", id: "err-agents" })),
    h("label", { for: "every" }, "every (s)"), h("div", {}, every_s, h("div", { class: "hint" }, "empty: one-off; a number: a recurring measurement that each agent runs from its own copy")),
    h("label", { for: "deadline" }, "deadline (s)"), h("div", {}, deadline, h("div", { class: "hint" }, "one-off: agents that have not reported by then count as expired")),
    h("div", {}), h("div", {}, h("button", { id: "submit", type: "submit" }, "Run"), formError));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    for (const e of form.querySelectorAll(".field-error")) e.textContent = "";
    for (const e of form.querySelectorAll(".invalid")) e.classList.remove("invalid");
    const params = {};
    for (const input of fields.querySelectorAll("input, select")) {
      const v = valueOf(input);
      if (v !== undefined) params[input.name] = v;
    }
    const agents = {};
    const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);
    if (sel.all.checked) agents.all = true;
    if (sel.ids.value.trim()) agents.ids = list(sel.ids.value);
    if (sel.tags.value.trim()) agents.tags = list(sel.tags.value);
    if (sel.country.value.trim()) agents.country = sel.country.value.trim();
    if (sel.asn.value) agents.asn = Number(sel.asn.value);
    if (sel.limit.value) agents.limit = Number(sel.limit.value);
    const body = { module: select.value, params, agents };
    if (every_s.value) body.schedule = { interval_s: Number(every_s.value) };
    else if (deadline.value) body.deadline_s = Number(deadline.value);
    try {
      const r = await api("/v1/measurements", { method: "POST", body });
      location.hash = `#/m/${encodeURIComponent(r.id)}`;
    } catch (e) {
      const field = (e.body && e.body.field) || "";
      const name = field.replace(/^\//, "").split("/")[0];
      const target = field.startsWith("/agents") ? document.getElementById("err-agents") : document.getElementById(`err-${name}`);
      if (target && name) {
        target.textContent = e.message;
        const input = document.getElementById(`p-${name}`);
        if (input) input.classList.add("invalid");
      } else {
        formError.textContent = e.message;
      }
    }
  });
  view.replaceChildren(h("h1", {}, "New measurement"), form);
  render();
}

// ---- a measurement, live ---------------------------------------------------------

async function measurementPage(id) {
  const enc = encodeURIComponent(id);
  const summary = h("p", { id: "summary" }, "…");
  const states = h("div", { id: "agent-states" });
  const chart = h("div", { class: "charts", id: "rtt-chart" });
  const tbody = h("tbody");
  // The heat map, loss and paths (views.js), from the newest results.
  const views = measurementViews(id);
  view.replaceChildren(h("h1", {}, "Measurement ", h("span", { class: "mono" }, id)), summary,
    h("h2", {}, "Agents"), states, views.el, h("h2", {}, "RTT of each probe"), chart,
    h("h2", {}, "Results (live)"), h("table", { id: "results" }, h("thead", {}, h("tr", {}, ["finished", "agent", "state", "result"].map((c) => h("th", {}, c)))), tbody));
  const series = {};
  const drawChart = () => {
    const list = Object.entries(series).map(([name, points]) => ({ name, points }));
    chart.replaceChildren(list.length
      ? lineChart({ title: "RTT of each probe", series: list, xLabel: "probe #", yLabel: "RTT (ms)", yUnit: "ms", width: 640, legend: true })
      : h("p", { class: "muted" }, "no RTTs yet"));
  };
  drawChart();
  stream(`/v1/measurements/${enc}/stream`, (r) => {
    tbody.append(h("tr", { "data-agent": r.agent_id }, h("td", {}, fmtTs(r.finished_at)), h("td", {}, r.agent_id), stateCell(r.state), h("td", {}, summarize(r))));
    for (const t of (r.result && r.result.targets) || []) {
      const key = `${r.agent_id} → ${t.addr || t.host}`;
      const s = series[key] = series[key] || [];
      for (const rtt of t.rtts_ms || []) s.push([s.length + 1, rtt]);
    }
    drawChart();
  });
  every(3000, views.refresh);
  every(1000, async () => {
    const m = await api(`/v1/measurements/${enc}`);
    summary.replaceChildren(h("span", { class: m.state }, m.state), ` — ${m.progress.summary}`, m.schedule ? ` — every ${m.schedule.interval_s} s` : "");
    states.replaceChildren(table(["agent", "state", m.schedule ? "runs" : "request", "alive"], m.agents.map((a) => h("tr", {},
      h("td", {}, h("a", { href: `#/agent/${encodeURIComponent(a.agent_id)}` }, a.agent_id)),
      stateCell(a.state || a.schedule),
      h("td", {}, a.request_id ? h("a", { href: `#/request/${encodeURIComponent(a.request_id)}`, class: "mono" }, a.request_id.slice(0, 8)) : String(a.runs)),
      stateCell(a.alive ? "alive" : "offline")))));
  });
}

// ---- alerts ------------------------------------------------------------------------

// One alert or anomaly event as a table row: when, what, for which rule or key, and
// its message (the summary of an alert, the detector's words for an anomaly).
function eventRow(e) {
  const when = h("td", {}, fmtTs(e.at));
  if (e.type === "alert") {
    return h("tr", { "data-event": e.id, class: "alert-row" }, when, h("td", { class: e.state }, e.state),
      h("td", {}, e.rule_name, " ", h("a", { href: `#/m/${encodeURIComponent(e.measurement_id)}`, class: "mono" }, (e.measurement_id || "").slice(0, 8))),
      h("td", {}, e.summary || ""));
  }
  return h("tr", { "data-event": e.id, class: "anomaly-row" }, when, h("td", { class: "anomaly" }, e.anomaly),
    h("td", {}, `${e.agent} → ${e.target} (${e.module})`), h("td", {}, e.message || ""));
}

async function alertsPage() {
  const rules = h("div", { id: "alert-rules" });
  const tbody = h("tbody");
  const events = h("table", { id: "alert-events" }, h("thead", {}, h("tr", {}, ["at", "what", "rule or key", "details"].map((c) => h("th", {}, c)))), tbody);
  view.replaceChildren(h("h1", {}, "Alerts"),
    h("p", { class: "muted" }, "Rules watch a measurement's status-check thresholds or the anomaly detector; they are made with POST /v1/alert-rules (see the API page)."),
    h("h2", {}, "Rules"), rules, h("h2", {}, "Events (live, newest first)"), events);
  const seen = new Set();
  const add = (e) => {
    if (seen.has(e.id)) return;
    seen.add(e.id);
    tbody.prepend(eventRow(e));
    while (tbody.children.length > 200) tbody.lastChild.remove();
  };
  const [a, n] = await Promise.all([api("/v1/alerts?order=newest&limit=100"), api("/v1/anomalies?order=newest&limit=100")]);
  const first = a.events.concat(n.events).sort((x, y) => Number(x.id.slice(1)) - Number(y.id.slice(1)));
  first.forEach(add);
  stream("/v1/alerts/stream", add);
  every(2000, async () => {
    const r = await api("/v1/alert-rules");
    rules.replaceChildren(r.rules.length ? table(["rule", "state", "since", "measurement", "watches", "webhook"], r.rules.map((x) => h("tr", { "data-rule": x.id },
      h("td", {}, x.name), h("td", { class: x.state }, x.state), h("td", {}, x.since ? fmtAgo(x.since) : "-"),
      h("td", {}, h("a", { href: `#/m/${encodeURIComponent(x.measurement_id)}`, class: "mono" }, x.measurement_id.slice(0, 8))),
      h("td", {}, x.kind === "anomaly" ? x.anomalies.join(", ") : Object.entries(x.thresholds).map(([k, v]) => `${k}=${v}`).join(" "),
        x.for_s ? ` for ${x.for_s} s` : ""),
      h("td", { class: "mono" }, x.webhook ? x.webhook.url : "-"))))
      : h("p", { class: "muted" }, "no rules"));
  });
}

// ---- request lookup --------------------------------------------------------------

async function requestPage(id) {
  const enc = encodeURIComponent(id);
  let r;
  try {
    r = await api(`/modules/states/${enc}`);
  } catch (e) {
    if (e.status === 404) {
      try { await api(`/v1/measurements/${enc}`); location.hash = `#/m/${enc}`; return; } catch (_) { /* neither */ }
    }
    view.replaceChildren(h("h1", {}, "Not found"), h("p", { id: "lookup-error" }, e.message));
    return;
  }
  const result = h("div");
  view.replaceChildren(h("h1", {}, "Request ", h("span", { class: "mono" }, id)),
    h("p", {}, "Agent ", h("a", { href: `#/agent/${encodeURIComponent(r.agent_id)}` }, r.agent_id), `, module ${r.module}, state `, h("span", { class: r.state, id: "request-state" }, r.state), r.trace_id ? `, trace ${r.trace_id}` : ""),
    table(["at", "state", "by", "detail"], r.transitions.map((t) => h("tr", {}, h("td", {}, fmtTs(t.at)), stateCell(t.state), h("td", {}, t.observer), h("td", {}, t.detail || "")))),
    h("h2", {}, "Result"), result);
  try {
    const res = await api(`/agents/${encodeURIComponent(r.agent_id)}/results/${enc}`);
    result.replaceChildren(h("p", {}, summarize(res)), h("pre", { class: "mono" }, JSON.stringify(res.result, null, 2)));
  } catch (_) {
    result.replaceChildren(h("p", { class: "muted" }, "no result yet"));
  }
}

// ---- routing ---------------------------------------------------------------------

async function route() {
  state.page += 1;
  state.timers.forEach(clearInterval);
  state.timers = [];
  state.streams.forEach((s) => s.stop());
  state.streams = [];
  banner("");
  // `#/rollouts` and `#rollouts` alike.
  const parts = (location.hash || "#/").replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  document.getElementById("nav-fleet").className = parts[0] === "" || parts[0] === "agent" ? "active" : "";
  document.getElementById("nav-rollouts").className = parts[0] === "rollouts" || parts[0] === "rollout" ? "active" : "";
  document.getElementById("nav-measure").className = parts[0] === "measure" || parts[0] === "m" ? "active" : "";
  document.getElementById("nav-alerts").className = parts[0] === "alerts" ? "active" : "";
  try {
    if (parts[0] === "agent" && parts[1]) await agentPage(parts[1]);
    else if (parts[0] === "rollouts") await rolloutsPage();
    else if (parts[0] === "rollout" && parts[1]) await rolloutPage(parts[1]);
    else if (parts[0] === "measure") await measurePage();
    else if (parts[0] === "alerts") await alertsPage();
    else if (parts[0] === "m" && parts[1]) await measurementPage(parts[1]);
    else if (parts[0] === "request" && parts[1]) await requestPage(parts[1]);
    else await fleetPage();
  } catch (e) {
    banner(e.message);
  }
}

document.getElementById("lookup").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = document.getElementById("lookup-id").value.trim();
  if (id) location.hash = `#/request/${encodeURIComponent(id)}`;
});
const tokenInput = document.getElementById("token");
tokenInput.value = state.token;
document.getElementById("token-save").addEventListener("click", () => {
  state.token = tokenInput.value.trim();
  localStorage.setItem("imn-token", state.token);
  route();
});
window.addEventListener("hashchange", route);
route();
