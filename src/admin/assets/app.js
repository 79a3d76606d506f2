// pgfire dashboard: the little JavaScript the pages use. Everything works without it except the
// live parts: the status bar refreshes every 5 s, the executions list shows new runs as they
// happen (polling /api/executions), and the chart redraws every 30 s. Markup it inserts comes
// from the server, which escapes every value.
(function () {
  "use strict";

  function refreshStatus() {
    fetch("/api/status", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (!body) return;
        var bar = document.querySelector(".statusbar");
        if (bar) bar.outerHTML = body.html;
      })
      .catch(function () {
        var stream = document.getElementById("st-stream");
        if (stream) { stream.textContent = "dashboard unreachable"; stream.className = "bad"; }
      });
  }

  function liveRuns() {
    var tbody = document.getElementById("runs");
    if (!tbody || tbody.dataset.live !== "true") return;
    var busy = false;
    function poll() {
      if (busy) return;
      busy = true;
      var q = tbody.dataset.query;
      var url = "/api/executions?after=" + encodeURIComponent(tbody.dataset.after) + (q ? "&" + q : "");
      fetch(url, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (body) {
          if (!body || !body.rows.length) return;
          var template = document.createElement("template");
          body.rows.forEach(function (html, i) {
            template.innerHTML = html;
            var row = template.content.firstElementChild;
            if (row) { row.classList.add("new"); tbody.insertBefore(row, tbody.firstChild); }
            var id = body.runs[i].id;
            if (id > Number(tbody.dataset.after)) tbody.dataset.after = String(id);
          });
          var empty = document.getElementById("runs-empty");
          if (empty) empty.remove();
        })
        .catch(function () {})
        .then(function () { busy = false; });
    }
    setInterval(poll, 1000);
  }

  function refreshChart() {
    var chart = document.getElementById("chart");
    if (!chart) return;
    setInterval(function () {
      fetch("/api/chart", { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (svg) { if (svg) chart.innerHTML = svg; })
        .catch(function () {});
    }, 30000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    setInterval(refreshStatus, 5000);
    liveRuns();
    refreshChart();
    // The card named in the address is shown open and in view.
    var open = document.querySelector("details[open] > summary");
    if (open && location.hash) open.scrollIntoView({ block: "start" });
  });
})();
