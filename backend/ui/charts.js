// Line charts as SVG: axes with units, grid, ticks, a legend, and the nearest point's
// value on hover. No library: the dashboard must work with no internet.
"use strict";

const COLORS = ["#2456c8", "#d9480f", "#2b8a3e", "#ae3ec9", "#1098ad", "#f08c00", "#5c7cfa", "#c2255c"];
const SVGNS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Round tick steps: 1, 2, 5 × 10^n.
function ticks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function fmtNum(v) {
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1);
  if (Math.abs(v) >= 1) return v.toFixed(2);
  return v.toPrecision(2);
}

function fmtTime(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// opts: {title, series: [{name, points: [[x, y], ...]}], xLabel, yLabel, xTime, yUnit, yRange: [lo, hi], width, height, legend}
function lineChart(opts) {
  const W = opts.width || 520, H = opts.height || 220;
  const m = { l: 58, r: 34, t: 10, b: 42 };
  const box = document.createElement("div");
  box.className = "chart-box";
  if (opts.title) { const h = document.createElement("h3"); h.textContent = opts.title; box.appendChild(h); }
  const svg = svgEl("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart" });
  box.appendChild(svg);
  const pts = opts.series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  if (pts.length === 0) {
    svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    return box;
  }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = Math.min(0, ...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (opts.yRange) {
    // A fixed range (loss: 0 to 100 %), widened if a value falls outside it.
    y0 = Math.min(opts.yRange[0], y0); y1 = Math.max(opts.yRange[1], y1);
  } else {
    if (y1 === y0) { y1 = y0 + 1; }
    y1 += (y1 - y0) * 0.08;
  }
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (y) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);
  for (const t of ticks(y0, y1, 4)) {
    svg.appendChild(svgEl("line", { class: "grid", x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }));
    svg.appendChild(svgEl("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end" }, fmtNum(t)));
  }
  const xt = opts.xTime ? ticks(x0, x1, 4) : ticks(x0, x1, Math.min(6, Math.max(1, x1 - x0)));
  for (const t of xt) {
    if (t < x0 || t > x1) continue;
    svg.appendChild(svgEl("line", { class: "axis", x1: X(t), x2: X(t), y1: H - m.b, y2: H - m.b + 4 }));
    svg.appendChild(svgEl("text", { x: X(t), y: H - m.b + 16, "text-anchor": "middle" }, opts.xTime ? fmtTime(t) : fmtNum(t)));
  }
  svg.appendChild(svgEl("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
  svg.appendChild(svgEl("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }));
  svg.appendChild(svgEl("text", { x: (m.l + W - m.r) / 2, y: H - 6, "text-anchor": "middle" }, opts.xLabel || ""));
  svg.appendChild(svgEl("text", { x: 12, y: (m.t + H - m.b) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(m.t + H - m.b) / 2})` }, opts.yLabel || ""));
  opts.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    let d = "", pen = false;
    for (const [x, y] of s.points) {
      if (y === null || y === undefined) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`;
      pen = true;
    }
    svg.appendChild(svgEl("path", { class: "series", d, stroke: color, "data-name": s.name }));
    for (const [x, y] of s.points) {
      if (y === null || y === undefined) continue;
      svg.appendChild(svgEl("circle", { cx: X(x), cy: Y(y), r: 2.2, fill: color }));
    }
  });
  if (opts.series.length > 1 || opts.legend) {
    const legend = document.createElement("div");
    legend.className = "muted";
    legend.innerHTML = opts.series.map((s, i) => `<span style="color:${COLORS[i % COLORS.length]}">&#9632;</span> ${escapeHtml(s.name)}`).join(" &nbsp; ");
    box.appendChild(legend);
  }
  // Hover: the nearest point of any series.
  const tip = document.getElementById("tip");
  svg.addEventListener("mousemove", (ev) => {
    const r = svg.getBoundingClientRect();
    const mx = ((ev.clientX - r.left) / r.width) * W, my = ((ev.clientY - r.top) / r.height) * H;
    let best = null;
    opts.series.forEach((s) => s.points.forEach(([x, y]) => {
      if (y === null || y === undefined) return;
      const dd = (X(x) - mx) ** 2 + (Y(y) - my) ** 2;
      if (!best || dd < best.dd) best = { dd, s, x, y };
    }));
    if (!best || !tip) return;
    tip.hidden = false;
    tip.style.left = ev.clientX + 12 + "px";
    tip.style.top = ev.clientY + 12 + "px";
    const xs = opts.xTime ? fmtTime(best.x) : `${opts.xLabel || "x"} ${fmtNum(best.x)}`;
    tip.textContent = `${best.s.name}: ${fmtNum(best.y)} ${opts.yUnit || ""} (${xs})`;
  });
  svg.addEventListener("mouseleave", () => { if (tip) tip.hidden = true; });
  return box;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
