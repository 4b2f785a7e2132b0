// The dashboard's live chart: polls stats.json every 2 s and draws processed and
// failed per second (Exq's realtime counters) for the last 120 s on a canvas;
// it also refreshes the numbers above it. Values are set with textContent only.
(function () {
  var canvas = document.getElementById("live");
  if (!canvas) { return; }
  var src = canvas.getAttribute("data-src");
  var status = document.getElementById("live-status");
  var WINDOW = 120;

  function series(points, now) {
    var counts = new Array(WINDOW).fill(0);
    points.forEach(function (p) {
      var i = WINDOW - 1 - Math.round(now - p[0]);
      if (i >= 0 && i < WINDOW) { counts[i] += p[1]; }
    });
    return counts;
  }

  function draw(processed, failed) {
    var ctx = canvas.getContext("2d");
    var w = canvas.width, h = canvas.height, pad = 28;
    ctx.clearRect(0, 0, w, h);
    var top = Math.max(1, Math.max.apply(null, processed), Math.max.apply(null, failed));
    ctx.strokeStyle = "#e3e6ec"; ctx.fillStyle = "#6b7280"; ctx.font = "11px sans-serif";
    [0, 0.5, 1].forEach(function (f) {
      var y = h - pad - f * (h - 2 * pad);
      ctx.beginPath(); ctx.moveTo(pad + 20, y); ctx.lineTo(w, y); ctx.stroke();
      ctx.fillText(String(Math.round(top * f)), 0, y + 4);
    });
    function line(values, color) {
      ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
      values.forEach(function (v, i) {
        var x = pad + 20 + i * (w - pad - 20) / (WINDOW - 1);
        var y = h - pad - (v / top) * (h - 2 * pad);
        if (i === 0) { ctx.moveTo(x, y); } else { ctx.lineTo(x, y); }
      });
      ctx.stroke();
    }
    line(processed, "#7cb342");
    line(failed, "#c62828");
  }

  function refresh() {
    fetch(src, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (data) {
        var now = data.now;  // the server's clock: the counters are stamped by it
        draw(series(data.realtime.processed, now), series(data.realtime.failed, now));
        Object.keys(data.summary).forEach(function (key) {
          var el = document.getElementById("stat-" + key);
          if (el) { el.textContent = String(data.summary[key]); }
        });
        status.textContent = "";
      })
      .catch(function (err) { status.textContent = " (not updating: " + err.message + ")"; });
  }
  refresh();
  setInterval(refresh, 2000);
})();
