"""The stylesheet and the script of the HTML report (html.py), kept apart so
that the Python reads on its own.

The script reads the report's JSON (the same object as `--format json`) from
the page and draws the charts as inline SVG, every colour and font set as an
attribute so that the PNG export (SVG -> image -> canvas -> PNG, no network)
looks like the page. It fetches nothing. When done it sets
<html data-report="ready"> and writes what it drew into <pre id="summary">
(JSON: per chart, each series with its points and its largest value) for tests
and scripts that read the DOM. URL parameters: `?view=KEY` (a process key or
`total`), `?measure=rss|pss|uss`, `?png=1` (export the main chart and say so
in the summary instead of downloading)."""

from __future__ import annotations

STYLE = """
body{font-family:"DejaVu Sans",Verdana,Arial,sans-serif;font-size:14px;color:#222;
  margin:0;background:#f6f6f2}
header{background:#263238;color:#eceff1;padding:12px 24px}
header h1{margin:0 0 4px 0;font-size:20px;font-weight:600}
header .meta{font-size:13px;color:#b0bec5}
main{padding:8px 24px 40px 24px;max-width:1260px}
.banner{background:#fdecea;border:1px solid #e53935;color:#b71c1c;padding:10px 14px;
  margin:12px 0;border-radius:4px;font-weight:600}
.banner.warn{background:#fff8e1;border-color:#f9a825;color:#6d4c00}
.bar{display:flex;gap:12px;align-items:center;margin:14px 0 6px 0;flex-wrap:wrap}
.bar select{font-size:14px;padding:3px}
.facts{display:flex;gap:10px;flex-wrap:wrap;margin:8px 0 4px 0}
.fact{background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px 10px}
.fact b{display:block;font-size:17px}
.fact span{font-size:12px;color:#666}
h2{font-size:17px;margin:26px 0 6px 0;border-bottom:1px solid #ccc;padding-bottom:3px}
h3{font-size:15px;margin:18px 0 6px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:8px 10px;margin:8px 0}
.tools{display:flex;gap:6px;align-items:center;margin-bottom:4px;flex-wrap:wrap}
.tools button{font-size:13px;padding:3px 10px;border:1px solid #999;background:#f4f4f4;
  border-radius:3px;cursor:pointer}
.tools button.on{background:#263238;color:#fff;border-color:#263238}
.tools button:disabled{opacity:0.4;cursor:default}
.tools .note{font-size:12px;color:#666;margin-left:8px}
.chart svg{width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:13px;background:#fff;margin:6px 0}
th,td{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
th{background:#eceff1;font-weight:600}
td.l,th.l{text-align:left;white-space:normal;word-break:break-all;max-width:520px}
td.up{color:#b71c1c}td.down{color:#1b5e20}
.verdict{margin:6px 0;padding:6px 10px;background:#e3f2fd;border-left:4px solid #1565c0}
.muted{color:#777}
iframe.flame{width:100%;border:1px solid #ddd;background:#f8f8f4}
#tip{position:fixed;pointer-events:none;background:rgba(38,50,56,0.95);color:#fff;
  font-size:12px;padding:6px 8px;border-radius:3px;display:none;z-index:9;max-width:420px}
#tip td{color:#fff;border:0;padding:0 4px;background:none}
#summary{display:none}
section.proc{display:none}
section.proc.shown{display:block}
"""

SCRIPT = r""""use strict";
(function () {
  var doc = document.documentElement;
  var R = JSON.parse(document.getElementById("report-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var FONT = "DejaVu Sans, Verdana, Arial, sans-serif";
  var KIND_COLOURS = {heap: "#e53935", anon: "#fb8c00", stack: "#8e24aa", executable: "#6d4c41",
    library: "#1e88e5", file: "#43a047", shmem: "#d81b60", special: "#9e9e9e"};
  var LIB_COLOURS = ["#1565c0", "#00838f", "#3949ab", "#0277bd", "#00695c", "#5c6bc0",
    "#26a69a", "#42a5f5", "#80cbc4"];
  var HEAP_LAYERS = [["in_use", "in use", "#1e88e5"],
    ["free_kept", "free, resident, kept", "#fbc02d"],
    ["trimmable", "free, trimmable (malloc_trim)", "#e53935"]];
  var TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
    21600, 43200, 86400];
  var summary = {charts: {}};
  var q = new URLSearchParams(window.location.search);
  var measure = q.get("measure") || "rss";
  try {
    main();
    doc.setAttribute("data-report", "ready");
  } catch (e) {
    doc.setAttribute("data-report", "error: " + e + " " + (e.stack || ""));
    throw e;
  } finally {
    writeSummary();
  }

  function main() {
    var sel = document.getElementById("view");
    var want = q.get("view");
    if (want && document.getElementById("proc-" + want)) sel.value = want;
    sel.addEventListener("change", function () { show(sel.value); });
    document.querySelectorAll("button[data-measure]").forEach(function (b) {
      b.addEventListener("click", function () { measure = b.getAttribute("data-measure");
        show(sel.value); });
    });
    document.querySelectorAll("button.png").forEach(function (b) {
      b.addEventListener("click", function () { exportPng(b.getAttribute("data-key"), true); });
    });
    show(sel.value);
    if (q.get("png")) exportPng(sel.value, false);
  }

  function byKey(key) {
    if (key === "total") return R.total;
    for (var i = 0; i < R.processes.length; i++)
      if (R.processes[i].key === key) return R.processes[i];
    return null;
  }

  function show(key) {
    document.querySelectorAll("section.proc").forEach(function (s) {
      s.classList.toggle("shown", s.id === "proc-" + key);
    });
    var p = byKey(key), started = performance.now();
    summary.view = key;
    summary.charts = {};
    if (!p) return;
    var known = {rss: true, pss: hasValues(p.totals.pss), uss: hasValues(p.totals.uss)};
    if (!known[measure]) measure = "rss";
    summary.measure = measure;
    document.querySelectorAll("#proc-" + cssKey(key) + " button[data-measure]").forEach(
      function (b) {
        var m = b.getAttribute("data-measure");
        b.classList.toggle("on", m === measure);
        b.disabled = !known[m];
        if (!known[m]) b.title = m.toUpperCase() + " was not recorded (PSS off or not root)";
      });
    var box = document.getElementById("mem-" + key);
    if (box) memoryChart(box, p, key);
    var hbox = document.getElementById("heap-" + key);
    if (hbox && p.heap) heapChart(hbox, p);
    summary.draw_ms = Math.round(performance.now() - started);
    writeSummary();
  }

  function cssKey(key) { return key.replace(/[^A-Za-z0-9_-]/g, "\\$&"); }
  function hasValues(a) { return a.some(function (v) { return v !== null; }); }

  // -- formatting ---------------------------------------------------------------
  function fmt(n) {
    if (n === null || n === undefined) return "-";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], a = Math.abs(n), i = 0;
    while (a >= 1024 && i < units.length - 1) { a /= 1024; i++; }
    return (n < 0 ? "-" : "") + (i === 0 ? a.toFixed(0) : a.toFixed(1)) + " " + units[i];
  }
  function clock(ts) {
    var d = new Date(ts * 1000);
    function two(x) { return (x < 10 ? "0" : "") + x; }
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }
  function base(path) { var i = path.lastIndexOf("/"); return i >= 0 ? path.slice(i + 1) : path; }

  // -- SVG helpers ----------------------------------------------------------------
  function el(parent, name, attrs, text) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function txt(parent, x, y, s, attrs) {
    var a = {x: x, y: y, "font-family": FONT, "font-size": 12, fill: "#333"};
    for (var k in attrs || {}) a[k] = attrs[k];
    return el(parent, "text", a, s);
  }
  function niceStep(raw) {
    var p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
  }
  function byteTicks(max) {
    var unit = 1;
    while (max / unit >= 1024 && unit < Math.pow(1024, 4)) unit *= 1024;
    var step = niceStep(Math.max(max / unit, 1e-9) / 5) * unit, out = [];
    for (var v = 0; v <= max * 1.0001 + step; v += step) { out.push(v); if (v >= max) break; }
    return out;
  }
  function timeTicks(t0, t1, n) {
    var span = Math.max(t1 - t0, 1), step = TIME_STEPS[TIME_STEPS.length - 1];
    for (var i = 0; i < TIME_STEPS.length; i++)
      if (span / TIME_STEPS[i] <= n) { step = TIME_STEPS[i]; break; }
    var out = [], first = Math.ceil(t0 / step) * step;
    for (var t = first; t <= t1; t += step) out.push(t);
    return out;
  }

  // -- a stacked area chart ------------------------------------------------------
  // spec: {ts, layers: [{name, label, colour, values}], title, markers: [{ts, label, colour}],
  //        strips: [{label, colour, counts}], peak: {ts, value, label}}
  function stacked(box, spec) {
    box.textContent = "";
    var W = 1180, LEG = 300, L = 78, T = 50, PW = W - LEG - L - 16, PH = 280;
    var stripH = spec.strips.length ? 14 * spec.strips.length + 8 : 0;
    var H = T + PH + 28 + stripH + 12;
    var svg = el(box, "svg", {xmlns: NS, viewBox: "0 0 " + W + " " + H, width: W, height: H,
      "data-chart": spec.id});
    el(svg, "rect", {x: 0, y: 0, width: W, height: H, fill: "#ffffff"});
    txt(svg, L, 20, spec.title, {"font-size": 15, "font-weight": "bold", fill: "#222"});
    var ts = spec.ts, n = ts.length;
    var t0 = spec.t0 !== undefined ? spec.t0 : n ? ts[0] : 0;
    var t1 = spec.t1 !== undefined ? spec.t1 : n ? ts[n - 1] : 1;
    if (t1 <= t0) t1 = t0 + 1;
    var tops = new Array(n).fill(0);
    spec.layers.forEach(function (layer) {
      layer.values.forEach(function (v, i) { tops[i] += v || 0; });
    });
    var ymax = Math.max.apply(null, tops.concat([1]));
    var yt = byteTicks(ymax), ytop = yt[yt.length - 1];
    function X(t) { return L + (t - t0) / (t1 - t0) * PW; }
    function Y(v) { return T + PH - v / ytop * PH; }
    yt.forEach(function (v) {
      el(svg, "line", {x1: L, x2: L + PW, y1: Y(v), y2: Y(v), stroke: "#e6e6e6"});
      txt(svg, L - 6, Y(v) + 4, fmt(v).replace(".0 ", " "), {"text-anchor": "end",
        fill: "#555"});
    });
    timeTicks(t0, t1, 8).forEach(function (t) {
      el(svg, "line", {x1: X(t), x2: X(t), y1: T + PH, y2: T + PH + 4, stroke: "#777"});
      txt(svg, X(t), T + PH + 17, clock(t), {"text-anchor": "middle", fill: "#555"});
    });
    var below = new Array(n).fill(0), drawn = [];
    spec.layers.forEach(function (layer) {
      var up = [], down = [], maxv = 0, pts = 0;
      for (var i = 0; i < n; i++) {
        var v = layer.values[i];
        if (v === null || v === undefined) continue;
        up.push(X(ts[i]).toFixed(2) + "," + Y(below[i] + v).toFixed(2));
        down.push(X(ts[i]).toFixed(2) + "," + Y(below[i]).toFixed(2));
        maxv = Math.max(maxv, v); pts++;
      }
      for (var j = 0; j < n; j++) below[j] += layer.values[j] || 0;
      var d = pts ? "M" + up.join("L") + "L" + down.reverse().join("L") + "Z" : "";
      el(svg, "path", {d: d, fill: layer.colour, "fill-opacity": 0.85, stroke: layer.colour,
        "stroke-width": 0.6, "data-series": layer.name, "data-points": pts, "data-max": maxv});
      drawn.push({name: layer.name, label: layer.label, colour: layer.colour, points: pts,
        max: maxv});
    });
    el(svg, "line", {x1: L, x2: L + PW, y1: T + PH, y2: T + PH, stroke: "#555"});
    el(svg, "line", {x1: L, x2: L, y1: T, y2: T + PH, stroke: "#555"});
    (spec.markers || []).forEach(function (m) {
      var x = X(m.ts);
      var g = el(svg, "g", {"data-marker": m.kind});
      el(g, "line", {x1: x, x2: x, y1: T, y2: T + PH, stroke: m.colour, "stroke-width": 1,
        "stroke-dasharray": "4,3"});
      el(g, "path", {d: "M" + (x - 5) + "," + (T - 1) + "L" + (x + 5) + "," + (T - 1) + "L" + x +
        "," + (T + 7) + "Z", fill: m.colour});
      el(g, "title", {}, m.label);
    });
    var sy = T + PH + 28;
    (spec.strips || []).forEach(function (s) {
      var most = Math.max.apply(null, s.counts.concat([1])), total = 0;
      txt(svg, L - 6, sy + 10, s.label, {"text-anchor": "end", "font-size": 11, fill: s.colour});
      el(svg, "rect", {x: L, y: sy, width: PW, height: 12, fill: "#f5f5f5"});
      s.counts.forEach(function (c, i) {
        if (!c) return;
        total += c;
        var h = 3 + 9 * Math.log(1 + c) / Math.log(1 + most);
        el(svg, "rect", {x: X(ts[i]) - 1, y: sy + 12 - h, width: 2, height: h, fill: s.colour});
      });
      txt(svg, L + PW + 6, sy + 10, total + " calls", {"font-size": 11, fill: "#555"});
      sy += 14;
    });
    if (spec.peak && spec.peak.ts !== null) {
      var px = X(spec.peak.ts), py = Y(spec.peak.value);
      el(svg, "circle", {cx: px, cy: py, r: 4, fill: "#000", stroke: "#fff", "stroke-width": 1.5});
      var right = px > L + PW * 0.6;
      txt(svg, px + (right ? -8 : 8), py - 8, spec.peak.label,        // above the dot
        {"text-anchor": right ? "end" : "start", "font-weight": "bold", fill: "#000",
         stroke: "#fff", "stroke-width": 3, "paint-order": "stroke"});
    }
    var ly = T + 4;
    txt(svg, L + PW + 24, ly + 2, spec.legendTitle || "", {"font-weight": "bold"});
    drawn.slice().reverse().forEach(function (d) {
      ly += 19;
      el(svg, "rect", {x: L + PW + 24, y: ly - 10, width: 12, height: 12, fill: d.colour});
      var label = d.label.length > 30 ? d.label.slice(0, 14) + "\u2026" + d.label.slice(-15)
                                      : d.label;
      var t = txt(svg, L + PW + 42, ly, label + "  " + fmt(d.max));
      el(t, "title", {}, d.name + ": largest " + fmt(d.max));
    });
    hover(svg, box, spec, X, L, PW, T, PH, W, H);
    return {series: drawn, top: ymax, points: n};
  }

  function hover(svg, box, spec, X, L, PW, T, PH, W, H) {
    var tip = document.getElementById("tip");
    var line = el(svg, "line", {x1: 0, x2: 0, y1: T, y2: T + PH, stroke: "#000",
      "stroke-width": 0.7, visibility: "hidden"});
    svg.addEventListener("mousemove", function (e) {
      var r = svg.getBoundingClientRect(), x = (e.clientX - r.left) * W / r.width;
      if (x < L || x > L + PW || !spec.ts.length) { tip.style.display = "none";
        line.setAttribute("visibility", "hidden"); return; }
      var best = 0;
      for (var i = 1; i < spec.ts.length; i++)
        if (Math.abs(X(spec.ts[i]) - x) < Math.abs(X(spec.ts[best]) - x)) best = i;
      var bx = X(spec.ts[best]);
      line.setAttribute("x1", bx); line.setAttribute("x2", bx);
      line.setAttribute("visibility", "visible");
      var rows = "", sum = 0;
      spec.layers.slice().reverse().forEach(function (l) {
        var v = l.values[best];
        sum += v || 0;
        if (v) rows += "<tr><td>" + esc(l.label) + "</td><td>" + fmt(v) + "</td></tr>";
      });
      tip.innerHTML = "<b>" + clock(spec.ts[best]) + "</b> total " + fmt(sum) +
        "<table>" + rows + "</table>";
      tip.style.display = "block";
      tip.style.left = Math.min(e.clientX + 14, window.innerWidth - 430) + "px";
      tip.style.top = (e.clientY + 14) + "px";
    });
    svg.addEventListener("mouseleave", function () { tip.style.display = "none";
      line.setAttribute("visibility", "hidden"); });
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;"}[c]; }); }

  // -- the charts of a process (or of the total) -------------------------------------
  function memoryChart(box, p, key) {
    var libs = 0;
    var layers = p.series[measure].map(function (s) {
      var colour = KIND_COLOURS[s.kind] || "#9e9e9e";
      if (s.kind === "library" && s.name !== "other libraries" && key !== "total")
        colour = LIB_COLOURS[libs++ % LIB_COLOURS.length];
      if (s.name === "other libraries") colour = "#90a4ae";
      var label = s.kind === "library" && s.name !== "other libraries" && key !== "total"
        ? base(s.name) : s.name;
      return {name: s.name, label: label, colour: colour, values: s.values};
    });
    var markers = [], strips = [];
    (p.library_events || []).forEach(function (e) {
      var load = e.event === "library_load";
      markers.push({ts: e.ts, kind: load ? "dlopen" : "dlclose",
        colour: load ? "#2e7d32" : "#6a1b9a",
        label: (load ? "loaded " : "unloaded ") + e.mapping + " (" + fmt(e.rss_bytes) + ")"});
    });
    if (p.calls) {
      strips.push({label: "brk", colour: "#c62828", counts: p.calls.brk});
      strips.push({label: "mmap", colour: "#ef6c00", counts: p.calls.mmap});
      strips.push({label: "munmap", colour: "#5d4037", counts: p.calls.munmap});
    }
    var pi = argmax(p.totals[measure]);
    var who = key === "total" ? "all processes" : p.comm + " (pid " + p.pid + ")";
    var res = stacked(box, {id: "memory", ts: p.ts, layers: layers, markers: markers,
      strips: strips, legendTitle: key === "total" ? "by kind" : "by kind and library",
      title: "Resident memory (" + measure.toUpperCase() + ") of " + who + ", stacked",
      peak: pi === null ? null : {ts: p.ts[pi], value: p.totals[measure][pi],
        label: "peak " + fmt(p.totals[measure][pi]) + " at " + clock(p.ts[pi])}});
    res.peak = pi === null ? null : p.totals[measure][pi];
    res.markers = markers.length;
    res.strips = strips.map(function (s) { return {name: s.label,
      calls: s.counts.reduce(function (a, b) { return a + b; }, 0)}; });
    summary.charts.memory = res;
  }

  function heapChart(box, p) {
    var h = p.heap;
    if (!h.ts || !h.ts.length) { summary.charts.heap = {series: [], points: 0}; return; }
    var layers = HEAP_LAYERS.map(function (l) {
      return {name: l[0], label: l[1], colour: l[2], values: h[l[0]]}; });
    var res = stacked(box, {id: "heap", ts: h.ts, layers: layers, markers: [], strips: [],
      t0: Math.min(p.ts[0], h.ts[0]), t1: Math.max(p.ts[p.ts.length - 1], h.ts[h.ts.length - 1]),
      legendTitle: "glibc heap", title: "glibc malloc heap of " + p.comm + " (pid " + p.pid +
      "): resident bytes by state"});
    summary.charts.heap = res;
  }

  function argmax(a) {
    var best = null;
    for (var i = 0; i < a.length; i++)
      if (a[i] !== null && (best === null || a[i] > a[best])) best = i;
    return best;
  }

  // -- PNG export: SVG -> image -> canvas -> PNG, all in the page ----------------------
  function exportPng(key, download) {
    var svg = document.querySelector("#mem-" + cssKey(key) + " svg");
    if (!svg) return;
    var xml = new XMLSerializer().serializeToString(svg);
    var img = new Image(), scale = 2;
    img.onload = function () {
      var c = document.createElement("canvas");
      c.width = svg.viewBox.baseVal.width * scale;
      c.height = svg.viewBox.baseVal.height * scale;
      var ctx = c.getContext("2d");
      ctx.scale(scale, scale);
      ctx.drawImage(img, 0, 0);
      var url = c.toDataURL("image/png");
      summary.png = {bytes: Math.floor((url.length - 22) * 3 / 4), width: c.width,
        height: c.height, prefix: url.slice(0, 22)};
      writeSummary();
      if (download) {
        var a = document.createElement("a");
        a.href = url;
        a.download = "memtrace-" + key + ".png";
        document.body.appendChild(a); a.click(); a.remove();
      }
    };
    img.onerror = function () { summary.png = {error: "image did not load"}; writeSummary(); };
    img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(xml);
  }

  function writeSummary() {
    var pre = document.getElementById("summary");
    if (pre) pre.textContent = JSON.stringify(summary);
  }
})();
"""
