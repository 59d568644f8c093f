"""The stylesheet and the script of the flame graph (flamegraph.py): kept apart
so that the Python of the layout reads on its own.

The script only reads the SVG's own elements (each frame's data-n, data-d and
rect), so the SVG alone stays a complete picture; it fetches nothing. It keeps
no state but the frames' original x and width: zooming lays frames out again
from those, and `fit` cuts text as flamegraph.fit does."""

from __future__ import annotations

STYLE = (
    'text{font-family:Verdana,"DejaVu Sans",sans-serif;font-size:12px;fill:#000}'
    "#title{font-size:17px}"
    "g.f{cursor:pointer}"
    "g.f:hover rect{stroke:#000;stroke-width:0.6}"
    "g.f.a{opacity:0.55}"
    "#unzoom{cursor:pointer;fill:#22c}"
)

SCRIPT = r""""use strict";
(function () {
  var doc = document.documentElement;
  try {
    main();
    // the root is at the bottom: a graph taller than the window opens there,
    // on its widest frames, not on the tips of its deepest stacks
    window.scrollTo(0, doc.scrollHeight);
    doc.setAttribute("data-flamegraph", "ready");
  } catch (e) {
    doc.setAttribute("data-flamegraph", "error: " + e);
    throw e;
  }

  function main() {
    var svg = document.getElementById("flamegraph");
    var PAD = +svg.getAttribute("data-pad"), FULL = +svg.getAttribute("data-width") - 2 * PAD;
    var FONT = +svg.getAttribute("data-font"), CHAR = +svg.getAttribute("data-char");
    var EPS = 0.01, HIT = "rgb(230,0,230)";
    var frames = Array.prototype.slice.call(svg.querySelectorAll("g.f"));
    var details = document.getElementById("details");
    var matched = document.getElementById("matched");
    var unzoom = document.getElementById("unzoom");
    var search = document.getElementById("search");
    var byId = {};
    frames.forEach(function (g) {
      var r = g.querySelector("rect");
      g.fg = {x: +r.getAttribute("x"), w: +r.getAttribute("width"), d: +g.getAttribute("data-d"),
              fill: r.getAttribute("fill"), name: g.getAttribute("data-n"),
              info: g.querySelector("title").textContent.replace(/\n/g, " \u00b7 ")};
      byId[g.id] = g;
    });

    function fit(text, w) {
      var chars = Math.floor((w - 6) / (FONT * CHAR));
      if (chars < 3) return "";
      return text.length <= chars ? text : text.slice(0, chars - 2) + "..";
    }

    function place(g, x, w, show, dim) {
      g.style.display = show ? "" : "none";
      if (!show) return;
      var r = g.querySelector("rect"), t = g.querySelector("text");
      r.setAttribute("x", x.toFixed(3));
      r.setAttribute("width", w.toFixed(3));
      t.setAttribute("x", (x + 3).toFixed(3));
      t.textContent = fit(g.fg.name, w);
      g.classList.toggle("a", dim);
    }

    function zoom(target) {
      if (!target) {
        frames.forEach(function (g) { place(g, g.fg.x, g.fg.w, true, false); });
        unzoom.setAttribute("visibility", "hidden");
        doc.removeAttribute("data-zoom");
        return;
      }
      var t = target.fg, scale = FULL / t.w;
      frames.forEach(function (g) {
        var f = g.fg;
        if (f.d < t.d) {       // a caller: shown whole width, dimmed, if it holds the target
          place(g, PAD, FULL, f.x <= t.x + EPS && f.x + f.w >= t.x + t.w - EPS, true);
        } else {               // the target and its callees, stretched
          var inside = f.x >= t.x - EPS && f.x + f.w <= t.x + t.w + EPS;
          place(g, PAD + (f.x - t.x) * scale, f.w * scale, inside, false);
        }
      });
      unzoom.setAttribute("visibility", "visible");
      doc.setAttribute("data-zoom", target.id);
    }

    function find(re) {
      var spans = [];
      frames.forEach(function (g) {
        var hit = !!re && re.test(g.fg.name);
        g.querySelector("rect").setAttribute("fill", hit ? HIT : g.fg.fill);
        if (hit) spans.push([g.fg.x, g.fg.x + g.fg.w]);
      });
      spans.sort(function (a, b) { return a[0] - b[0]; });
      var covered = 0, end = -Infinity;     // a frame inside a matched one counts once
      spans.forEach(function (s) {
        if (s[1] > end) { covered += s[1] - Math.max(s[0], end); end = s[1]; }
      });
      matched.textContent = re ? "Matched: " + (100 * covered / FULL).toFixed(1) + "%" : " ";
      doc.setAttribute("data-matched", spans.length);
    }

    function searchFor(text) {
      if (!text) { find(null); return; }
      try { find(new RegExp(text, "i")); } catch (e) { /* not a regex yet: keep typing */ }
    }

    svg.addEventListener("click", function (e) {
      var g = e.target.closest("g.f");
      if (g) zoom(g);
      else if (e.target === unzoom) zoom(null);
    });
    svg.addEventListener("mouseover", function (e) {
      var g = e.target.closest("g.f");
      details.textContent = g ? g.fg.info : " ";
    });
    if (search) search.addEventListener("input", function () { searchFor(search.value); });

    var q = new URLSearchParams(window.location.search);
    if (q.get("s")) {
      if (search) search.value = q.get("s");
      searchFor(q.get("s"));
    }
    if (q.get("x") && byId[q.get("x")]) zoom(byId[q.get("x")]);
    doc.setAttribute("data-frames", frames.length);
  }
})();
"""
