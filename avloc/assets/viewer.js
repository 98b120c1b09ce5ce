// avloc view: one tile per stream; frames arrive as JPEG + heatmap bytes over one WebSocket (see stream/clients/view.py).
"use strict";

const grid = document.getElementById("grid");
const tiles = new Map();
const luts = {};
for (const [name, rows] of Object.entries(CONFIG.colormaps)) luts[name] = Uint8Array.from(rows.flat());
let alpha = CONFIG.alpha;
let colormap = CONFIG.colormap;
let serverDropped = 0; // reported by the server: updates replaced before this page took them
let pageDropped = 0; // updates replaced here while a JPEG was still decoding
const decoder = new TextDecoder();
const token = new URLSearchParams(location.search).get("token");

// --- controls --------------------------------------------------------------------------------------------
const alphaInput = document.getElementById("alpha");
const cmapSelect = document.getElementById("colormap");
alphaInput.value = alpha;
document.getElementById("alpha-value").textContent = alpha.toFixed(2);
for (const name of Object.keys(luts)) cmapSelect.add(new Option(name, name, false, name === colormap));
alphaInput.addEventListener("input", () => {
  alpha = Number(alphaInput.value);
  document.getElementById("alpha-value").textContent = alpha.toFixed(2);
  tiles.forEach(draw);
});
cmapSelect.addEventListener("change", () => { colormap = cmapSelect.value; tiles.forEach(draw); });

// --- tiles ----------------------------------------------------------------------------------------------
function el(tag, cls, parent) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (parent) parent.appendChild(e);
  return e;
}

function tileFor(stream) {
  let t = tiles.get(stream);
  if (t) return t;
  const root = el("div", "tile", null);
  root.dataset.stream = stream;
  const h = el("h2", null, root);
  el("span", "name", h).textContent = stream;
  const state = el("span", "state", h);
  const view = el("div", "view", root);
  const canvas = el("canvas", "frame", view);
  const peak = el("div", "peak", view);
  const notice = el("div", "notice", view);
  const info = el("div", "info", root);
  const lat = el("canvas", "lat", root);
  const legend = el("div", "info legend", root);
  legend.innerHTML = '<span style="color:#5ab0ff">— e2e p50</span><span style="color:#ffb454">— p99</span>' +
    "<span>last 30 s, 1 s buckets; hover for stages</span>";
  const tip = el("div", "tip", root);
  lat.width = 360; lat.height = 90;
  t = {stream, root, canvas, ctx: canvas.getContext("2d"), peak, notice, state, info, lat, tip,
       frames: 0, heatmaps: 0, lastArrival: performance.now(), last: null, busy: false, pending: null,
       stats: null, heat: document.createElement("canvas")};
  lat.addEventListener("mousemove", (ev) => hover(t, ev));
  lat.addEventListener("mouseleave", () => { t.tip.style.display = "none"; });
  tiles.set(stream, t);
  // keep the grid in stream order
  const after = [...grid.children].find((c) => c.dataset.stream > stream);
  grid.insertBefore(root, after || null);
  return t;
}

// --- frames ---------------------------------------------------------------------------------------------
function onBinary(buf) {
  const n = new DataView(buf).getUint32(0, true);
  const header = JSON.parse(decoder.decode(new Uint8Array(buf, 4, n)));
  const jpeg = new Blob([new Uint8Array(buf, 4 + n, header.jpeg)], {type: "image/jpeg"});
  const heat = header.hm ? new Uint8Array(buf, 4 + n + header.jpeg, header.hm[0] * header.hm[1]) : null;
  const t = tileFor(header.stream);
  t.lastArrival = performance.now();
  const item = {header, jpeg, heat};
  if (t.busy) {
    if (t.pending) pageDropped++;
    t.pending = item;
    return;
  }
  decode(t, item);
}

async function decode(t, item) {
  t.busy = true;
  try {
    const bitmap = await createImageBitmap(item.jpeg);
    if (t.last) t.last.bitmap.close();
    t.last = {bitmap, header: item.header, heat: item.heat};
    t.frames++;
    if (item.heat || item.header.notice === "no_audio") t.heatmaps++;
    draw(t);
  } catch (err) {
    console.warn("avloc view: cannot decode a frame", err);
  } finally {
    t.busy = false;
    if (t.pending) { const next = t.pending; t.pending = null; decode(t, next); }
  }
}

function heatImage(t, heat, shape) {
  // stretched to its own min..max, as the OpenCV display does, so the hot spot shows
  const [h, w] = shape;
  let lo = 255, hi = 0;
  for (const v of heat) { if (v < lo) lo = v; if (v > hi) hi = v; }
  const scale = hi > lo ? 255 / (hi - lo) : 0;
  const lut = luts[colormap];
  const img = new ImageData(w, h);
  for (let i = 0; i < heat.length; i++) {
    const k = Math.round((heat[i] - lo) * scale) * 3;
    img.data[4 * i] = lut[k]; img.data[4 * i + 1] = lut[k + 1]; img.data[4 * i + 2] = lut[k + 2];
    img.data[4 * i + 3] = 255;
  }
  t.heat.width = w; t.heat.height = h;
  t.heat.getContext("2d").putImageData(img, 0, 0);
  return t.heat;
}

function draw(t) {
  const last = t.last;
  if (!last) return;
  const {bitmap, header} = last;
  if (t.canvas.width !== bitmap.width || t.canvas.height !== bitmap.height) {
    t.canvas.width = bitmap.width; t.canvas.height = bitmap.height;
  }
  const ctx = t.ctx;
  ctx.globalAlpha = 1;
  ctx.drawImage(bitmap, 0, 0);
  // a not_visible map is below the engine's silence gate: no overlay, no peak (it points at nothing)
  const shown = last.heat && header.notice !== "not_visible";
  if (shown) {
    ctx.imageSmoothingEnabled = true;
    ctx.globalAlpha = alpha;
    // map_box: where an engine with image.fit crop / letterbox puts its map on the frame (default: all of it)
    const b = header.map_box || [0, 0, 1, 1];
    const W = bitmap.width, H = bitmap.height;
    ctx.drawImage(heatImage(t, last.heat, header.hm), b[0] * W, b[1] * H, (b[2] - b[0]) * W, (b[3] - b[1]) * H);
    ctx.globalAlpha = 1;
  }
  if (shown && header.peak) {
    t.peak.style.left = (100 * header.peak[0]) + "%";
    t.peak.style.top = (100 * header.peak[1]) + "%";
    t.peak.style.display = "block";
    t.root.dataset.peak = header.peak.join(",");
  } else {
    t.peak.style.display = "none";
    delete t.root.dataset.peak;
  }
  // the server's wording (stream/clients/display.py notice_text: "WARMING UP 40%"), the raw name as a fallback
  t.notice.classList.toggle("warming", header.notice === "warming_up");  // drawn, but not to be trusted yet
  t.notice.textContent = header.notice_text || (header.notice ? header.notice.replace("_", " ").toUpperCase() : "");
  Object.assign(t.root.dataset, {frames: t.frames, heatmaps: t.heatmaps, seq: header.seq,
                                 notice: header.notice || "", noticeText: t.notice.textContent,
                                 colormap, alpha});
  t.root.dataset.confidence = header.confidence === null ? "" : header.confidence;
  info(t);
}

function fmt(v, digits = 1) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }

function info(t) {
  const h = t.last ? t.last.header : {};
  const s = t.stats || {};
  t.info.textContent = `#${h.seq ?? "–"} · frames ${t.frames} · heatmaps ${t.heatmaps} · ` +
    `conf ${fmt(h.confidence, 3)}${h.gate ? " (gate " + fmt(h.gate, 3) + ")" : ""} · ` +
    `${fmt(s.heatmap_fps)} heatmaps/s · e2e p50 ${fmt(s.p50)} / p99 ${fmt(s.p99)} ms` +
    (h.pipeline_drops ? ` · pipeline drops ${h.pipeline_drops}` : "");
}

// --- latency plot ---------------------------------------------------------------------------------------
function plot(t) {
  const c = t.lat, ctx = c.getContext("2d");
  const W = c.width, H = c.height, pad = 4;
  ctx.clearRect(0, 0, W, H);
  const buckets = (t.stats && t.stats.buckets) || [];
  const top = Math.max(10, ...buckets.map((b) => b.p99)) * 1.15;
  const x = (tb) => W - pad - ((-tb) / CONFIG.window_s) * (W - 2 * pad);
  const y = (ms) => H - pad - (ms / top) * (H - 2 * pad);
  ctx.fillStyle = "#777"; ctx.font = "10px sans-serif";
  ctx.fillText(`${top.toFixed(0)} ms`, 4, 10);
  ctx.fillText("-30 s", 4, H - 4);
  for (const [key, color] of [["p50", "#5ab0ff"], ["p99", "#ffb454"]]) {
    ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
    buckets.forEach((b, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(b.t), y(b[key])));
    ctx.stroke();
  }
}

function hover(t, ev) {
  const buckets = (t.stats && t.stats.buckets) || [];
  if (!buckets.length) return;
  const r = t.lat.getBoundingClientRect();
  const at = -CONFIG.window_s * (1 - (ev.clientX - r.left) / r.width);
  const b = buckets.reduce((best, c) => (Math.abs(c.t - at) < Math.abs(best.t - at) ? c : best));
  const stages = Object.entries(b.stages)
    .map(([k, v]) => `  ${k.replace("→", " -> ").padEnd(28)} ${v.toFixed(1).padStart(7)} ms`);
  t.tip.textContent = `${b.t.toFixed(0)} s: e2e p50 ${b.p50.toFixed(1)} / p99 ${b.p99.toFixed(1)} ms ` +
    `(${b.n} heatmaps)\nstage medians:\n${stages.join("\n")}`;
  const root = t.root.getBoundingClientRect();
  t.tip.style.left = Math.max(0, Math.min(ev.clientX - root.left + 12, root.width - 280)) + "px";
  t.tip.style.top = (r.top - root.top - 8) + "px";
  t.tip.style.transform = "translateY(-100%)";
  t.tip.style.display = "block";
}

function onStats(msg) {
  serverDropped = msg.dropped;
  for (const [stream, s] of Object.entries(msg.streams)) {
    const t = tileFor(stream);
    t.stats = s;
    info(t);
    plot(t);
  }
}

// --- stalled streams, connection ------------------------------------------------------------------------
setInterval(() => {
  const now = performance.now();
  for (const t of tiles.values()) {
    const stalled = now - t.lastArrival > CONFIG.stall_s * 1000;
    t.root.classList.toggle("stalled", stalled);
    t.root.dataset.stalled = stalled ? "1" : "0";
    t.state.textContent = stalled ? `stalled (${((now - t.lastArrival) / 1000).toFixed(0)} s)` : "live";
  }
  const d = document.getElementById("dropped");
  d.textContent = `dropped ${serverDropped + pageDropped}`;
  d.dataset.server = serverDropped; d.dataset.page = pageDropped;
}, 200);

function connect(delay) {
  const conn = document.getElementById("conn");
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = token ? "?token=" + encodeURIComponent(token) : "";
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { conn.textContent = "connected"; conn.className = ""; delay = 500; };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onStats(JSON.parse(ev.data)) : onBinary(ev.data));
  ws.onclose = () => {
    conn.textContent = "disconnected, retrying…"; conn.className = "bad";
    setTimeout(() => connect(Math.min(delay * 2, 5000)), delay);
  };
}
connect(500);
