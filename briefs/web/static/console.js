// The console's one script: live numbers and charts, live job and brief progress, tabs.
// Served from /static (the CSP allows no inline script). Text from the server is only ever set with
// textContent or setAttribute on SVG geometry: never innerHTML. The pages work without it.
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var TERMINAL = { completed: true, failed: true, cancelled: true, partial: true, skipped: true };

  document.documentElement.classList.add("js");

  // ------------------------------------------------------------------ helpers

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) { throw new Error(url + " answered " + response.status); }
        return response.json();
      });
  }

  function pick(data, path) {
    return path.split(".").reduce(function (value, key) {
      if (value === undefined) { return undefined; }
      return value === null ? null : value[key];
    }, data);
  }

  // The LLM circuit's state (briefs.circuit) and the colour it shows in.
  var CIRCUIT_CLASS = { closed: "ok", half_open: "degraded", open: "down" };

  function format(value, kind) {
    if (kind === "circuit") { return value === null || value === undefined ? "unknown" : String(value).replace("_", "-"); }
    if (kind === "okfail") { return value === null || value === undefined ? "no tick yet" : (value ? "ok" : "failed"); }
    if (value === null || value === undefined) { return "-"; }
    if (kind === "when" && typeof value === "string") { return value.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z"); }
    if (typeof value === "number") { return kind === "fixed1" ? value.toFixed(1) : value.toLocaleString("en-US"); }
    if (typeof value === "boolean") { return value ? "yes" : "no"; }
    if (typeof value === "object") { return JSON.stringify(value, null, 2); }
    return String(value);
  }

  function statusClass(value) {
    return "status status-" + String(value).toLowerCase().replace(/[^a-z_-]/g, "");
  }

  // Every [data-field="a.b"] under root shows that value of data (as text); [data-status] ones get its colour.
  function fill(root, data) {
    root.querySelectorAll("[data-field]").forEach(function (el) {
      var value = pick(data, el.getAttribute("data-field"));
      if (value === undefined) { return; }
      var text = format(value, el.getAttribute("data-format"));
      if (el.textContent !== text) { el.textContent = text; }
      if (el.hasAttribute("data-status")) { el.className = statusClass(value); }
      if (el.getAttribute("data-format") === "circuit") {
        el.className = statusClass(Object.prototype.hasOwnProperty.call(CIRCUIT_CLASS, value) ? CIRCUIT_CLASS[value] : "unknown");
      }
      if (el.getAttribute("data-format") === "okfail") {
        el.className = statusClass(value === null ? "unknown" : (value ? "ok" : "failed"));
      }
    });
  }

  function setLive(el, on) {
    var badge = el.querySelector(".live");
    if (badge) { badge.hidden = !on; }
  }

  // Poll url every `every` ms while keepGoing(data) holds; a failed poll is retried, shown as not live.
  function poll(el, url, every, onData, keepGoing) {
    function tick() {
      getJSON(url).then(function (data) {
        setLive(el, true);
        onData(data);
        if (!keepGoing || keepGoing(data)) { window.setTimeout(tick, every); } else { setLive(el, false); }
      }, function () {
        setLive(el, false);
        window.setTimeout(tick, every * 3);
      });
    }
    tick();
  }

  function svgEl(name, attrs, text) {
    var el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (key) { el.setAttribute(key, String(attrs[key])); });
    if (text !== undefined) { el.textContent = text; }
    return el;
  }

  function clear(el) {
    while (el.firstChild) { el.removeChild(el.firstChild); }
  }

  // ------------------------------------------------------------------ charts (SVG, drawn with DOM methods)

  var W = 600, H = 160, LEFT = 34, BOTTOM = 18, TOP = 8;

  function niceMax(value) {
    if (value <= 4) { return 4; }
    var step = Math.pow(10, Math.floor(Math.log10(value)));
    var top = Math.ceil(value / step) * step;
    return top < value ? top + step : top;
  }

  function axes(svg, max) {
    [0, 0.5, 1].forEach(function (f) {
      var y = H - BOTTOM - f * (H - BOTTOM - TOP);
      svg.appendChild(svgEl("line", { x1: LEFT, x2: W, y1: y, y2: y, "class": f === 0 ? "axis" : "grid" }));
      svg.appendChild(svgEl("text", { x: LEFT - 4, y: y + 3, "text-anchor": "end", "class": "tick" },
                            format(Math.round(max * f))));
    });
  }

  // Stacked bars of completed (and failed) per bucket; every few buckets labelled with their time.
  function drawSeries(svg, buckets, unit) {
    clear(svg);
    if (!Array.isArray(buckets) || buckets.length === 0) { return; }
    var totals = buckets.map(function (b) { return (b.completed || 0) + (b.failed || 0); });
    var max = niceMax(Math.max.apply(null, totals));
    axes(svg, max);
    var slot = (W - LEFT) / buckets.length, scale = (H - BOTTOM - TOP) / max, every = unit === "hour" ? 4 : 10;
    buckets.forEach(function (b, i) {
      var x = LEFT + i * slot + slot * 0.12, w = Math.max(1, slot * 0.76);
      var ok = (b.completed || 0) * scale, bad = (b.failed || 0) * scale, base = H - BOTTOM;
      if (ok > 0) { svg.appendChild(svgEl("rect", { x: x, y: base - ok, width: w, height: ok, "class": "bar-ok" })); }
      if (bad > 0) {
        svg.appendChild(svgEl("rect", { x: x, y: base - ok - bad, width: w, height: bad, "class": "bar-bad" }));
      }
      var bar = svg.lastChild;
      if (bar && bar.nodeName === "rect") {
        bar.appendChild(svgEl("title", {}, String(b.at).slice(11, 16) + "Z: " + (b.completed || 0) + " completed, " +
                                           (b.failed || 0) + " failed"));
      }
      if (i % every === 0) {
        svg.appendChild(svgEl("text", { x: x, y: H - 5, "class": "tick" }, String(b.at).slice(11, 16)));
      }
    });
  }

  // Horizontal bars: pending + running jobs per type, the deepest first.
  function drawQueue(svg, byType) {
    clear(svg);
    var rows = Object.keys(byType || {}).map(function (type) {
      var c = byType[type] || {};
      return { type: type, depth: (c.pending || 0) + (c.processing || 0) };
    }).filter(function (r) { return r.depth > 0; });
    rows.sort(function (a, b) { return b.depth - a.depth || (a.type < b.type ? -1 : 1); });
    rows = rows.slice(0, 6);
    if (rows.length === 0) {
      svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "class": "empty" },
                            "Nothing waiting"));
      return;
    }
    var max = niceMax(rows[0].depth), label = 170, row = (H - 4) / 6;
    rows.forEach(function (r, i) {
      var y = 2 + i * row, width = Math.max(1, (W - label - 50) * r.depth / max);
      var name = r.type.length > 26 ? r.type.slice(0, 25) + "…" : r.type;
      var text = svg.appendChild(svgEl("text", { x: label - 6, y: y + row * 0.62, "text-anchor": "end", "class": "tick" },
                                       name));
      text.appendChild(svgEl("title", {}, r.type));
      svg.appendChild(svgEl("rect", { x: label, y: y + row * 0.15, width: width, height: row * 0.7, "class": "bar-queue" }));
      svg.appendChild(svgEl("text", { x: label + width + 4, y: y + row * 0.62, "class": "tick" }, format(r.depth)));
    });
  }

  function workerRows(tbody, workers) {
    clear(tbody);
    if (!Array.isArray(workers) || workers.length === 0) {
      var empty = document.createElement("td");
      empty.colSpan = 3;
      empty.className = "muted";
      empty.textContent = "No worker seen in the last 5 minutes.";
      tbody.appendChild(document.createElement("tr")).appendChild(empty);
      return;
    }
    workers.forEach(function (w) {
      var tr = tbody.appendChild(document.createElement("tr"));
      [[w.id, "mono"], [format(w.running), "num"], [format(w.last_seen, "when"), ""]].forEach(function (cell) {
        var td = tr.appendChild(document.createElement("td"));
        td.textContent = cell[0] === null || cell[0] === undefined ? "-" : String(cell[0]);
        td.className = cell[1];
      });
    });
  }

  // The queue table: one row per type (a link to its jobs: the type only ever as an encoded query value).
  function queueRows(tbody, byType) {
    clear(tbody);
    var types = Object.keys(byType || {}).sort();
    if (types.length === 0) {
      var empty = document.createElement("td");
      empty.colSpan = 5;
      empty.className = "muted";
      empty.textContent = "The queue is empty.";
      tbody.appendChild(document.createElement("tr")).appendChild(empty);
      return;
    }
    types.forEach(function (type) {
      var counts = byType[type] || {}, tr = tbody.appendChild(document.createElement("tr"));
      var name = tr.appendChild(document.createElement("td"));
      name.className = "mono";
      var link = name.appendChild(document.createElement("a"));
      link.setAttribute("href", "/jobs?type=" + encodeURIComponent(type));
      link.textContent = type;
      ["pending", "processing", "failed", "completed"].forEach(function (status) {
        var td = tr.appendChild(document.createElement("td"));
        td.className = "num";
        td.textContent = format(counts[status] || 0);
      });
    });
  }

  function drawStats(el, stats) {
    fill(el, stats);
    el.querySelectorAll("svg[data-chart]").forEach(function (svg) {
      drawSeries(svg, pick(stats, svg.getAttribute("data-chart")), svg.getAttribute("data-label"));
    });
    el.querySelectorAll("svg[data-chart-queue]").forEach(function (svg) {
      drawQueue(svg, pick(stats, svg.getAttribute("data-chart-queue")));
    });
    el.querySelectorAll("tbody[data-rows=workers]").forEach(function (tbody) { workerRows(tbody, stats.workers); });
    el.querySelectorAll("tbody[data-rows=queue]").forEach(function (tbody) {
      queueRows(tbody, pick(stats, "jobs.by_type"));
    });
  }

  function liveStats(el) {
    poll(el, el.getAttribute("data-live-stats"), 1000, function (stats) { drawStats(el, stats); });
  }

  // ------------------------------------------------------------------ a brief: live while it is written

  function liveBrief(el) {
    var initial = el.getAttribute("data-status-initial");
    if (initial !== "processing") { return; }
    poll(el, el.getAttribute("data-live-brief"), 1000, function (brief) {
      fill(el, brief);
      el.querySelectorAll("progress[data-progress]").forEach(function (bar) {
        var progress = brief.progress || {};
        bar.max = Math.max(1, Number(progress.projects_total) || 0);
        bar.value = Number(progress.projects_done) || 0;
      });
      if (brief.status && brief.status !== initial && brief.status !== "processing") { window.location.reload(); }
    }, function (brief) { return !brief.status || brief.status === "processing"; });
  }

  // ------------------------------------------------------------------ tabs: one panel shown at a time

  function tabs(el) {
    var panels = Array.prototype.slice.call(el.querySelectorAll(":scope > .tabpanel"));
    if (panels.length < 2) { return; }
    var bar = document.createElement("div");
    bar.className = "tabs";
    bar.setAttribute("role", "tablist");
    var buttons = panels.map(function (panel, i) {
      var button = document.createElement("button");
      button.type = "button";
      button.setAttribute("role", "tab");
      button.id = "tab-" + panel.id;
      button.setAttribute("aria-controls", panel.id);
      button.textContent = panel.getAttribute("data-tab-title") || "Tab " + (i + 1);
      panel.setAttribute("role", "tabpanel");
      panel.setAttribute("aria-labelledby", button.id);
      button.addEventListener("click", function () { select(i); });
      return bar.appendChild(button);
    });
    function select(chosen) {
      panels.forEach(function (panel, i) { panel.hidden = i !== chosen; });
      buttons.forEach(function (button, i) { button.setAttribute("aria-selected", i === chosen ? "true" : "false"); });
    }
    el.insertBefore(bar, panels[0]);
    select(0);
  }

  // ------------------------------------------------------------------ one job: live while pending or running

  function liveJob(el) {
    var initial = el.getAttribute("data-status-initial");
    if (TERMINAL[initial]) { return; }
    poll(el, el.getAttribute("data-live-job"), 1000, function (job) {
      fill(el, job);
      // Finished: the page is drawn again by the server, with the buttons that now apply.
      if (job.status !== initial && TERMINAL[job.status]) { window.location.reload(); }
    }, function (job) { return !TERMINAL[job.status]; });
  }

  // ------------------------------------------------------------------ start

  function start() {
    document.querySelectorAll("[data-tabs]").forEach(tabs);
    document.querySelectorAll("[data-live-stats]").forEach(liveStats);
    document.querySelectorAll("[data-live-job]").forEach(liveJob);
    document.querySelectorAll("[data-live-brief]").forEach(liveBrief);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
