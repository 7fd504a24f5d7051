// A measurement's views, from its results as GET /v1/results gives them: the RTT heat
// map (agents × time buckets), loss over time, and for traceroute and mtr the newest
// path of each agent as a graph. Inline SVG only; every string that comes from an
// agent (ids, addresses) goes in as text or as an attribute's value, never as markup.
"use strict";

// Modules whose results have RTTs and a loss.
const RTT_MODULES = ["ping_module", "tcping", "dns", "http", "ntp", "traceroute", "mtr"];
const PATH_MODULES = ["traceroute", "mtr"];

function isNum(v) { return typeof v === "number" && Number.isFinite(v); }

// When the result was measured: its start (the agent's clock), else its end.
function resultTime(r) {
  const t = Date.parse(r.started_at || r.finished_at || "");
  return Number.isFinite(t) ? t : Date.parse(r.finished_at || "");
}

// What one result measured: its RTT samples (ms), and its probes sent and answered.
// A run that failed (no result) counts as one probe sent and none answered.
//   ping_module  every target's rtts_ms; sent and received
//   tcping       connect_ms of the attempts that connected; attempts and those open
//   dns          the reply's rt_ms; one query, answered or not
//   http         timing.total_ms; one request, answered unless it has an error
//   ntp          every packet's delay_ms; sent and received
//   traceroute   the RTTs of the destination's answers; the probes at its hop
//   mtr          the destination hop's rtts_ms, sent and received
// A trace that did not reach its destination counts as all lost.
function resultSamples(r) {
  const out = { rtts: [], sent: 0, received: 0 };
  const x = r.result;
  if (r.state !== "succeeded" || r.error || !x || typeof x !== "object") {
    out.sent = 1;
    return out;
  }
  const push = (v) => { if (isNum(v)) out.rtts.push(v); };
  const count = (v) => (isNum(v) && v >= 0 ? v : 0);
  switch (r.module) {
    case "ping_module":
      for (const t of Array.isArray(x.targets) ? x.targets : []) {
        if (!t || typeof t !== "object") continue;
        for (const v of Array.isArray(t.rtts_ms) ? t.rtts_ms : []) push(v);
        // A target that could not be resolved sent nothing: one probe lost.
        const sent = count(t.sent);
        out.sent += sent || 1;
        out.received += Math.min(count(t.received), sent);
      }
      break;
    case "tcping": {
      const at = Array.isArray(x.attempts) ? x.attempts : [];
      for (const a of at) if (a && a.outcome === "open") push(a.connect_ms);
      out.sent += at.length || 1;
      out.received += at.filter((a) => a && a.outcome === "open").length;
      break;
    }
    case "dns":
      out.sent = 1;
      if (x.reply && isNum(x.reply.rt_ms)) { push(x.reply.rt_ms); out.received = 1; }
      break;
    case "http":
      out.sent = 1;
      if (!x.error && x.timing && isNum(x.timing.total_ms)) { push(x.timing.total_ms); out.received = 1; }
      break;
    case "ntp":
      for (const p of Array.isArray(x.packets) ? x.packets : []) if (p) push(p.delay_ms);
      out.sent = count(x.sent) || 1;
      out.received = Math.min(count(x.received), out.sent);
      break;
    case "traceroute": {
      const hops = Array.isArray(x.hops) ? x.hops : [];
      const last = hops[hops.length - 1];
      const probes = last && Array.isArray(last.probes) ? last.probes : [];
      const fromDst = probes.filter((p) => p && p.from === x.dst_addr);
      if (x.destination_reached) for (const p of fromDst) push(p.rtt_ms);
      out.sent = probes.length || count(x.probes_per_hop) || 1;
      out.received = x.destination_reached ? Math.min(fromDst.length, out.sent) : 0;
      break;
    }
    case "mtr": {
      const hops = Array.isArray(x.hops) ? x.hops : [];
      const last = hops[hops.length - 1];
      const reached = !!x.destination_reached && !!last && Array.isArray(last.addrs) && last.addrs.some((a) => a && a.addr === x.dst_addr);
      if (reached) for (const v of Array.isArray(last.rtts_ms) ? last.rtts_ms : []) push(v);
      out.sent = (last && count(last.sent)) || count(x.rounds) || 1;
      out.received = reached ? Math.min(count(last.received), out.sent) : 0;
      break;
    }
    default:
      break;
  }
  return out;
}

function median(values) {
  if (!values.length) return null;
  const s = values.slice().sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// Bucket widths to choose from: the smallest that gives at most MAX_COLS columns and
// is not shorter than the schedule's interval.
const BUCKETS_MS = [1e3, 2e3, 5e3, 1e4, 15e3, 3e4, 6e4, 12e4, 3e5, 6e5, 9e5, 18e5, 36e5, 72e5, 108e5, 216e5, 432e5, 864e5, 1728e5, 6048e5];
const MAX_COLS = 60;

function bucketWidth(t0, t1, minMs) {
  for (const b of BUCKETS_MS) {
    if (b < (minMs || 0)) continue;
    if (Math.floor(t1 / b) - Math.floor(t0 / b) + 1 <= MAX_COLS) return b;
  }
  const day = 864e5;
  return Math.max(day, Math.ceil((t1 - t0) / MAX_COLS / day) * day);
}

// Results in a grid: for each agent and time bucket, the RTT samples, probes sent and
// answered, and how many results. `agents`: ids to show a row for even with no result.
function bucketize(results, agents, minBucketMs) {
  const times = results.map(resultTime).filter(Number.isFinite);
  const ids = new Set(agents || []);
  for (const r of results) ids.add(String(r.agent_id));
  const rows = [...ids].sort();
  if (!times.length) return { rows, cols: [], size: 0, cells: new Map() };
  const t0 = Math.min(...times), t1 = Math.max(...times);
  const size = bucketWidth(t0, t1, minBucketMs);
  const first = Math.floor(t0 / size) * size, last = Math.floor(t1 / size) * size;
  const cols = [];
  for (let t = first; t <= last; t += size) cols.push(t);
  const cells = new Map();
  for (const r of results) {
    const t = resultTime(r);
    if (!Number.isFinite(t)) continue;
    const key = `${r.agent_id}\n${Math.floor(t / size) * size}`;
    let c = cells.get(key);
    if (!c) cells.set(key, c = { rtts: [], sent: 0, received: 0, results: 0, failed: 0 });
    const s = resultSamples(r);
    c.rtts.push(...s.rtts);
    c.sent += s.sent;
    c.received += s.received;
    c.results += 1;
    if (r.state !== "succeeded" || r.error) c.failed += 1;
  }
  for (const c of cells.values()) c.median = median(c.rtts);
  return { rows, cols, size, cells };
}

function fmtBucket(ms, size) {
  const d = new Date(ms);
  if (size >= 864e5) return d.toLocaleDateString();
  if (size >= 36e5) return d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  return fmtTime(ms);
}

function fmtSpan(ms) {
  if (ms < 6e4) return `${ms / 1000} s`;
  if (ms < 36e5) return `${ms / 6e4} min`;
  if (ms < 864e5) return `${ms / 36e5} h`;
  return `${ms / 864e5} d`;
}

// The RTT scale: green (low) through yellow to red (high).
const HEAT_STOPS = [[0, [43, 138, 62]], [0.5, [250, 176, 5]], [1, [201, 42, 42]]];
const HEAT_EMPTY = "#e3e6eb";
const HEAT_FAIL = "#7048e8";

function heatColor(f) {
  f = Math.min(1, Math.max(0, isNum(f) ? f : 0));
  let i = 1;
  while (i < HEAT_STOPS.length - 1 && f > HEAT_STOPS[i][0]) i++;
  const [fa, ca] = HEAT_STOPS[i - 1], [fb, cb] = HEAT_STOPS[i];
  const k = fb > fa ? (f - fa) / (fb - fa) : 0;
  const c = ca.map((v, j) => Math.round(v + (cb[j] - v) * k));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function shorten(s, n) {
  s = String(s);
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
}

// The heat map: a row per agent, a column per time bucket, each cell coloured by the
// median of the RTT samples of the agent's results in the bucket; grey: no result;
// violet: results with no RTT (the runs failed, or every probe was lost).
// The most agents the heat map draws a row for (the rest are counted under it).
const HEAT_MAX_ROWS = 200;

function rttHeatmap(grid) {
  const { cols, size, cells } = grid;
  const rows = grid.rows.slice(0, HEAT_MAX_ROWS);
  const hidden = grid.rows.length - rows.length;
  const labelW = Math.min(180, Math.max(60, Math.max(0, ...rows.map((r) => Math.min(24, r.length))) * 7 + 12));
  const cellW = Math.max(8, Math.min(48, Math.floor(760 / Math.max(1, cols.length))));
  const cellH = 20, top = 6;
  const gridW = cellW * cols.length, gridH = cellH * rows.length;
  // Wide enough for the legend however few the columns.
  const W = labelW + Math.max(gridW + 80, 500) + 10, H = top + gridH + 92;
  const medians = [...cells.values()].map((c) => c.median).filter(isNum);
  const lo = medians.length ? Math.min(...medians) : 0, hi = medians.length ? Math.max(...medians) : 0;
  const frac = (v) => (hi > lo ? (v - lo) / (hi - lo) : 0);
  const svg = svgEl("svg", {
    id: "rtt-heatmap", class: "heatmap", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "median RTT per agent and time bucket", "data-bucket-ms": String(size),
    "data-min": medians.length ? String(lo) : "", "data-max": medians.length ? String(hi) : "",
  });
  rows.forEach((agent, i) => {
    const y = top + i * cellH;
    const g = svgEl("g", { class: "row", "data-agent": agent });
    const link = svgEl("a", { href: `#/agent/${encodeURIComponent(agent)}`, class: "row-label" });
    link.appendChild(svgEl("text", { x: labelW - 6, y: y + cellH / 2 + 4, "text-anchor": "end" }, shorten(agent, 24)));
    link.appendChild(svgEl("title", {}, agent));
    g.appendChild(link);
    cols.forEach((t, j) => {
      const c = cells.get(`${agent}\n${t}`);
      const kind = !c ? "empty" : isNum(c.median) ? "ok" : "fail";
      const loss = c && c.sent ? (100 * (c.sent - c.received)) / c.sent : null;
      const rect = svgEl("rect", {
        class: `cell ${kind}`, x: labelW + j * cellW, y, width: cellW - 1, height: cellH - 1,
        fill: kind === "ok" ? heatColor(frac(c.median)) : kind === "fail" ? HEAT_FAIL : HEAT_EMPTY,
        "data-agent": agent, "data-t": String(t), "data-rtt": kind === "ok" ? String(+c.median.toFixed(4)) : "",
        "data-results": String(c ? c.results : 0), "data-loss": loss === null ? "" : String(+loss.toFixed(2)),
      });
      const when = `${fmtBucket(t, size)} – ${fmtBucket(t + size, size)}`;
      let what;
      if (!c) what = "no result";
      else if (kind === "ok") what = `median RTT ${fmtNum(c.median)} ms of ${c.rtts.length} RTTs in ${c.results} result${c.results === 1 ? "" : "s"}${c.failed ? ` (${c.failed} failed)` : ""}, loss ${fmtNum(loss)} %`;
      else what = `${c.failed ? `${c.failed} of ${c.results} runs failed` : `${c.results} result${c.results === 1 ? "" : "s"}`}, no RTT (${fmtNum(loss || 0)} % loss)`;
      rect.appendChild(svgEl("title", {}, `${agent}, ${when}: ${what}`));
      g.appendChild(rect);
    });
    svg.appendChild(g);
  });
  // The time axis: a label every ~100 px, at its bucket's start.
  const every = Math.max(1, Math.ceil((size >= 36e5 ? 120 : 100) / cellW));
  const axisY = top + gridH;
  svg.appendChild(svgEl("line", { class: "axis", x1: labelW, x2: labelW + gridW, y1: axisY + 1, y2: axisY + 1 }));
  cols.forEach((t, j) => {
    if (j % every) return;
    const x = labelW + j * cellW;
    svg.appendChild(svgEl("line", { class: "axis", x1: x, x2: x, y1: axisY + 1, y2: axisY + 5 }));
    svg.appendChild(svgEl("text", { x, y: axisY + 17, "text-anchor": "start" }, fmtBucket(t, size)));
  });
  svg.appendChild(svgEl("text", { x: labelW + gridW / 2, y: axisY + 32, "text-anchor": "middle" },
    `time (buckets of ${fmtSpan(size)})${hidden > 0 ? `; the first ${rows.length} agents of ${grid.rows.length}` : ""}`));
  // The legend: the scale from its min to its max, and the two other colours.
  const ly = axisY + 46, lw = 160;
  const defs = svgEl("defs");
  const grad = svgEl("linearGradient", { id: "rtt-heatmap-scale", x1: "0", x2: "1", y1: "0", y2: "0" });
  for (const [f] of HEAT_STOPS) grad.appendChild(svgEl("stop", { offset: String(f), "stop-color": heatColor(f) }));
  defs.appendChild(grad);
  svg.appendChild(defs);
  const legend = svgEl("g", { class: "legend" });
  const lx = labelW;
  legend.appendChild(svgEl("text", { x: lx, y: ly + 11, "text-anchor": "start" }, "median RTT"));
  legend.appendChild(svgEl("rect", { class: "scale", x: lx + 72, y: ly, width: lw, height: 12, fill: "url(#rtt-heatmap-scale)" }));
  legend.appendChild(svgEl("text", { class: "legend-min", x: lx + 72, y: ly + 26, "text-anchor": "start" }, medians.length ? `${fmtNum(lo)} ms` : "–"));
  legend.appendChild(svgEl("text", { class: "legend-max", x: lx + 72 + lw, y: ly + 26, "text-anchor": "end" }, medians.length ? `${fmtNum(hi)} ms` : "–"));
  const sx = lx + 72 + lw + 24;
  legend.appendChild(svgEl("rect", { x: sx, y: ly, width: 12, height: 12, fill: HEAT_EMPTY }));
  legend.appendChild(svgEl("text", { x: sx + 16, y: ly + 11 }, "no result"));
  legend.appendChild(svgEl("rect", { x: sx + 90, y: ly, width: 12, height: 12, fill: HEAT_FAIL }));
  legend.appendChild(svgEl("text", { x: sx + 106, y: ly + 11 }, "failed or 100 % loss"));
  svg.appendChild(legend);
  return svg;
}

// Loss per time bucket: a line per agent for up to 10 agents, else all agents pooled.
function lossChart(grid) {
  const { rows, cols, cells } = grid;
  const pct = (cs) => {
    const sent = cs.reduce((n, c) => n + c.sent, 0), recv = cs.reduce((n, c) => n + c.received, 0);
    return sent ? (100 * (sent - recv)) / sent : null;
  };
  const series = rows.length <= 10
    ? rows.map((a) => ({ name: a, points: cols.map((t) => { const c = cells.get(`${a}\n${t}`); return [t, c ? pct([c]) : null]; }) }))
    : [{ name: "all agents", points: cols.map((t) => [t, pct(rows.map((a) => cells.get(`${a}\n${t}`)).filter(Boolean))]) }];
  return lineChart({
    title: rows.length <= 10 ? "Loss per agent" : `Loss, all ${rows.length} agents pooled`,
    series, xTime: true, xLabel: "time", yLabel: "loss (%)", yUnit: "%", yRange: [0, 100], width: 640, legend: true,
  });
}

// ---- paths -------------------------------------------------------------------------

// A trace's path: for each hop, the addresses that answered (none: `*`).
function tracePath(r) {
  const x = r.result;
  if (!x || typeof x !== "object" || !Array.isArray(x.hops)) return null;
  const hops = [];
  for (const hop of x.hops) {
    if (!hop || !Number.isInteger(hop.ttl) || hop.ttl < 1) continue;
    let addrs;
    if (r.module === "mtr") addrs = (Array.isArray(hop.addrs) ? hop.addrs : []).map((a) => a && a.addr);
    else addrs = (Array.isArray(hop.probes) ? hop.probes : []).map((p) => p && p.from);
    addrs = [...new Set(addrs.filter((a) => typeof a === "string" && a))];
    hops.push({ ttl: hop.ttl, addrs });
  }
  hops.sort((a, b) => a.ttl - b.ttl);
  return {
    agent: String(r.agent_id), dst: typeof x.dst_addr === "string" && x.dst_addr ? x.dst_addr : String(x.host || ""),
    reached: !!x.destination_reached, hops, at: resultTime(r),
  };
}

// Each agent's newest result that has a path.
function newestPaths(results) {
  const by = new Map();
  for (const r of results) {
    const p = tracePath(r);
    if (!p) continue;
    const had = by.get(p.agent);
    if (!had || !(had.at > p.at)) by.set(p.agent, p);
  }
  return [...by.values()].sort((a, b) => (a.agent < b.agent ? -1 : a.agent > b.agent ? 1 : 0));
}

// The paths as a graph, laid out by hop (x = TTL). A hop (or a link between hops)
// that is not on every agent's path has class `diverge`; the first hop where the
// paths differ is marked.
function pathGraph(paths) {
  const nodes = new Map(), edges = new Map();
  const node = (key, o) => { let n = nodes.get(key); if (!n) nodes.set(key, n = Object.assign({ key, agents: new Set(), preds: new Set() }, o)); return n; };
  const edge = (from, to, o) => {
    const key = `${from}\u0000${to}`;
    let e = edges.get(key);
    if (!e) edges.set(key, e = Object.assign({ from, to, agents: new Set() }, o));
    return e;
  };
  let minTtl = Infinity, maxTtl = 0;
  for (const p of paths) for (const hop of p.hops) { minTtl = Math.min(minTtl, hop.ttl); maxTtl = Math.max(maxTtl, hop.ttl); }
  if (!Number.isFinite(minTtl)) minTtl = 1;
  const unreached = paths.some((p) => !p.reached);
  for (const p of paths) {
    const src = node(`agent\u0000${p.agent}`, { kind: "agent", agent: p.agent, col: 0 });
    src.agents.add(p.agent);
    let prev = [src.key], prevHops = [];
    for (const hop of p.hops) {
      const col = hop.ttl - minTtl + 1;
      // A silent hop is one node per predecessor: shared only where the paths are.
      const keys = hop.addrs.length ? hop.addrs.map((a) => `${hop.ttl}\u0000${a}`) : [`${hop.ttl}\u0000*\u0000${prevHops.join("|")}`];
      hop.addrs.length
        ? hop.addrs.forEach((a, i) => node(keys[i], { kind: "hop", ttl: hop.ttl, addr: a, col }))
        : node(keys[0], { kind: "hop", ttl: hop.ttl, addr: "*", star: true, col });
      for (const k of keys) {
        const n = nodes.get(k);
        n.agents.add(p.agent);
        if (n.addr === p.dst && p.reached) n.dest = true;
        for (const pk of prev) {
          n.preds.add(pk);
          edge(pk, k, { fromAgent: pk === src.key }).agents.add(p.agent);
        }
      }
      prev = keys;
      prevHops = keys;
    }
    if (!p.reached) {
      const d = node(`dest\u0000${p.dst}`, { kind: "hop", addr: p.dst, dest: true, unreached: true, col: maxTtl - minTtl + 2 });
      d.agents.add(p.agent);
      for (const pk of prev) { d.preds.add(pk); edge(pk, d.key, { unreached: true, fromAgent: pk === src.key }).agents.add(p.agent); }
    }
  }
  const all = paths.length;
  let firstDiverge = null;
  for (const n of nodes.values()) {
    n.diverge = n.kind === "hop" && !n.unreached && n.agents.size < all;
    if (n.diverge && (firstDiverge === null || n.ttl < firstDiverge)) firstDiverge = n.ttl;
  }
  for (const e of edges.values()) e.diverge = !e.fromAgent && !e.unreached && e.agents.size < all;

  // Layout: columns by hop; in a column, nodes ordered by where their predecessors are.
  const ncols = Math.max(0, ...[...nodes.values()].map((n) => n.col)) + 1;
  const columns = Array.from({ length: ncols }, () => []);
  for (const n of nodes.values()) columns[n.col].push(n);
  const longest = Math.max(8, ...[...nodes.values()].map((n) => Math.min(40, String(n.kind === "agent" ? n.agent : n.addr).length)));
  const nodeW = Math.round(longest * 7 + 16), colW = nodeW + 44, nodeH = 24, rowH = 36, top = 30, left = 8;
  columns.forEach((col, c) => {
    const y = (n) => {
      const ys = [...n.preds].map((k) => nodes.get(k)).filter((p) => p && p.row !== undefined).map((p) => p.row);
      return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : 0;
    };
    if (c === 0) col.sort((a, b) => (a.agent < b.agent ? -1 : a.agent > b.agent ? 1 : 0));
    else col.sort((a, b) => y(a) - y(b) || (a.star ? 1 : 0) - (b.star ? 1 : 0) || (a.addr < b.addr ? -1 : a.addr > b.addr ? 1 : 0));
    col.forEach((n, i) => { n.row = i; });
  });
  const nrows = Math.max(1, ...columns.map((c) => c.length));
  const W = left + ncols * colW, H = top + nrows * rowH + 10;
  const X = (n) => left + n.col * colW, Y = (n) => top + n.row * rowH;
  const svg = svgEl("svg", {
    id: "path-graph", class: "path-graph", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "each agent's newest path, hop by hop", "data-first-diverge": firstDiverge === null ? "" : String(firstDiverge),
  });
  // Column heads: the agents, then the hops.
  for (let c = 0; c < ncols; c++) {
    const label = c === 0 ? "agents" : unreached && c === ncols - 1 ? "destination" : `hop ${c + minTtl - 1}`;
    svg.appendChild(svgEl("text", { class: "col-head", x: left + c * colW + nodeW / 2, y: 14, "text-anchor": "middle" }, label));
  }
  if (firstDiverge !== null) {
    const x = left + (firstDiverge - minTtl + 1) * colW - 22;
    svg.appendChild(svgEl("line", { class: "diverge-mark", x1: x, x2: x, y1: 20, y2: H - 4 }));
  }
  const eg = svgEl("g", { class: "edges" });
  for (const e of edges.values()) {
    const a = nodes.get(e.from), b = nodes.get(e.to);
    const x1 = X(a) + nodeW, y1 = Y(a) + nodeH / 2, x2 = X(b), y2 = Y(b) + nodeH / 2, mx = (x1 + x2) / 2;
    const path = svgEl("path", {
      class: `edge${e.diverge ? " diverge" : ""}${e.unreached ? " unreached" : ""}`,
      d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`,
      "data-from": a.kind === "agent" ? a.agent : a.addr, "data-to": b.addr,
    });
    path.appendChild(svgEl("title", {}, `${a.kind === "agent" ? a.agent : a.addr} → ${b.addr}${e.unreached ? " (not reached)" : ""}: ${[...e.agents].join(", ")}`));
    eg.appendChild(path);
  }
  svg.appendChild(eg);
  for (const n of nodes.values()) {
    const cls = n.kind === "agent" ? "node agent"
      : `node hop${n.star ? " star" : ""}${n.dest ? " destination" : ""}${n.unreached ? " unreached" : ""}${n.diverge ? " diverge" : ""}`;
    const attrs = { class: cls, transform: `translate(${X(n)},${Y(n)})` };
    if (n.kind === "agent") attrs["data-agent"] = n.agent;
    else { attrs["data-addr"] = n.addr; attrs["data-ttl"] = n.ttl === undefined ? "" : String(n.ttl); }
    const g = svgEl("g", attrs);
    g.appendChild(svgEl("rect", { width: nodeW, height: nodeH, rx: 4 }));
    g.appendChild(svgEl("text", { x: nodeW / 2, y: nodeH / 2 + 4, "text-anchor": "middle" }, shorten(n.kind === "agent" ? n.agent : n.addr, 40)));
    let title;
    if (n.kind === "agent") title = `agent ${n.agent}`;
    else if (n.unreached) title = `destination ${n.addr}: not reached by ${[...n.agents].join(", ")}`;
    else title = `${n.star ? "* (no answer)" : n.addr} at hop ${n.ttl}${n.dest ? " (the destination)" : ""}, on the path of ${[...n.agents].join(", ")}${n.diverge ? ` (${n.agents.size} of ${all} agents)` : ""}`;
    g.appendChild(svgEl("title", {}, title));
    if (n.kind === "agent") {
      const link = svgEl("a", { href: `#/agent/${encodeURIComponent(n.agent)}` });
      link.appendChild(g);
      svg.appendChild(link);
    } else svg.appendChild(g);
  }
  return svg;
}

// ---- loading -----------------------------------------------------------------------

// Most results the page loads (the newest); `?max_results=N` in the page's address
// lowers it.
const RESULTS_CAP = 5000;
const RESULTS_PAGE = 1000;
// Pages read per refresh; the rest come with the next refresh.
const PAGES_PER_LOAD = 20;

function resultsCap() {
  const v = Number(new URLSearchParams(location.search).get("max_results"));
  return Number.isInteger(v) && v >= 1 && v < RESULTS_CAP ? v : RESULTS_CAP;
}

// The views' section of a measurement's page, and its refresh: the first call reads
// the newest results (at most the cap), later calls what has been stored since.
function measurementViews(id) {
  const enc = encodeURIComponent(id);
  const cap = resultsCap();
  const note = h("p", { class: "muted", id: "results-note" }, "loading results…");
  const heat = h("div", { class: "heatmap-box", id: "rtt-heatmap-box" });
  const loss = h("div", { class: "charts", id: "loss-chart" });
  const pathBox = h("div", { class: "path-box", id: "path-graph-box" });
  const pathSection = h("div", { hidden: true }, h("h2", {}, "Paths (each agent's newest trace)"), pathBox);
  const rttSection = h("div", {}, h("h2", {}, "RTT heat map"), heat, h("h2", {}, "Loss"), loss);
  const el = h("div", { id: "measurement-views" }, note, rttSection, pathSection);
  const st = { m: null, results: [], cursor: "", since: null, read: 0, dropped: 0, more: true };

  const render = () => {
    const m = st.m;
    const kept = st.results.length;
    const total = Math.max(st.read, m.schedule ? (m.agents || []).reduce((n, a) => n + (a.runs || 0), 0) : ((m.progress && m.progress.reported) || 0));
    // Capped: results were read and let go, or the first read started past older ones.
    const capped = st.dropped > 0 || (st.since !== null && total > kept);
    note.className = capped ? "capped" : "muted";
    note.textContent = capped
      ? `Showing the newest ${kept.toLocaleString()} of ${total.toLocaleString()} results: the page loads at most ${cap.toLocaleString()}.`
      : `${kept.toLocaleString()} result${kept === 1 ? "" : "s"}${st.more ? ", loading more…" : ""}.`;
    note.dataset.capped = capped ? "true" : "false";
    note.dataset.loaded = String(kept);
    if (RTT_MODULES.includes(m.module)) {
      const minBucket = m.schedule && isNum(m.schedule.interval_s) ? m.schedule.interval_s * 1000 : 0;
      const grid = bucketize(st.results, (m.agents || []).map((a) => String(a.agent_id)), minBucket);
      heat.replaceChildren(grid.cols.length ? rttHeatmap(grid) : h("p", { class: "muted" }, "no results yet"));
      loss.replaceChildren(grid.cols.length ? lossChart(grid) : h("p", { class: "muted" }, "no results yet"));
    } else {
      rttSection.hidden = true;
    }
    if (PATH_MODULES.includes(m.module)) {
      pathSection.hidden = false;
      const paths = newestPaths(st.results);
      const first = paths.length ? pathGraph(paths) : null;
      const fd = first ? first.getAttribute("data-first-diverge") : "";
      pathBox.replaceChildren(
        h("p", { class: "muted" }, !paths.length ? "no traces yet"
          : paths.length === 1 ? `The newest trace of ${paths[0].agent}.`
            : fd ? `The agents' paths differ from hop ${fd} on (highlighted: hops and links not on every agent's path).`
              : `${paths.length === 2 ? "Both" : `All ${paths.length}`} agents' newest paths are the same.`),
        first);
    }
  };

  let busy = false;
  const refresh = async () => {
    // One read at a time: a slow one is not overtaken by the next tick.
    if (busy) return;
    busy = true;
    try { await read(); } finally { busy = false; }
  };
  // Up to PAGES_PER_LOAD pages from the cursor; whether any result came.
  const readPages = async () => {
    let changed = false;
    for (let i = 0; i < PAGES_PER_LOAD; i++) {
      const q = `measurement=${enc}&limit=${RESULTS_PAGE}${st.cursor ? `&cursor=${encodeURIComponent(st.cursor)}` : ""}${st.since !== null ? `&since=${st.since}` : ""}`;
      const page = await api(`/v1/results?${q}`);
      const got = Array.isArray(page.results) ? page.results : [];
      st.results.push(...got);
      st.read += got.length;
      if (st.results.length > cap) {
        st.dropped += st.results.length - cap;
        st.results.splice(0, st.results.length - cap);
      }
      if (got.length) changed = true;
      st.cursor = page.next_cursor || st.cursor;
      st.more = page.more === true;
      if (!st.more) break;
    }
    return changed;
  };

  // The first read. A long schedule starts about where its newest `cap` results begin
  // (twice as far back from its last run, to be safe) rather than at its first page,
  // and goes further back while that finds fewer than `cap`.
  const firstRead = async () => {
    const m = st.m, s = m.schedule, agents = m.agents || [];
    const runs = agents.reduce((k, a) => k + (a.runs || 0), 0);
    if (!s || !isNum(s.interval_s) || runs <= 2 * cap) return readPages();
    const lastRuns = agents.map((a) => Date.parse(a.last_run || "")).filter(Number.isFinite);
    const anchor = lastRuns.length ? Math.max(...lastRuns) : Date.now();
    const created = Date.parse(m.created || "");
    let back = 2 * Math.ceil(cap / (agents.length || 1)) * s.interval_s * 1000;
    for (;;) {
      const since = anchor - back;
      st.since = Number.isFinite(created) && since <= created ? null : since;
      Object.assign(st, { results: [], cursor: "", read: 0, dropped: 0, more: true });
      await readPages();
      if (st.more || st.results.length >= cap || st.since === null) return true;
      back *= 4;
    }
  };

  const read = async () => {
    let changed;
    if (!st.m) {
      st.m = await api(`/v1/measurements/${enc}`);
      changed = await firstRead();
    } else {
      if (st.m.schedule || st.m.state !== "complete") {
        try { st.m = await api(`/v1/measurements/${enc}`); } catch (_) { /* keep */ }
      }
      changed = await readPages();
    }
    if (changed || !el.dataset.rendered) {
      el.dataset.rendered = "1";
      render();
    }
  };
  return { el, refresh };
}
