// pynsqadmin's only script, and an optional one: every page is complete
// without it.  It refreshes the page's content in place every sample
// interval, unless the user is typing in a form or paused it.
(function () {
  "use strict";
  var body = document.body;
  var every = parseFloat(body.getAttribute("data-refresh")) || 0;
  var content = document.getElementById("content");
  var live = document.getElementById("live");
  var toggle = document.getElementById("live-toggle");
  // the notice of a finished action is shown once, not on every refresh
  if (window.URLSearchParams && window.history.replaceState) {
    var params = new URLSearchParams(window.location.search);
    if (params.has("done")) {
      params.delete("done");
      var query = params.toString();
      window.history.replaceState(null, "", window.location.pathname + (query ? "?" + query : ""));
    }
  }
  if (!every || !content || !window.fetch || !window.DOMParser) return;
  if (document.querySelector("form.confirm")) return;  // never refresh a confirmation away
  var paused = false;
  live.hidden = false;
  toggle.addEventListener("click", function () {
    paused = !paused;
    toggle.textContent = paused ? "resume live updates" : "pause live updates";
  });
  function busy() {
    var el = document.activeElement;
    return el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT");
  }
  function refresh() {
    if (paused || busy() || document.hidden) return schedule();
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Pynsqadmin-Refresh": "1" } })
      .then(function (resp) { return resp.ok ? resp.text() : null; })
      .then(function (html) {
        if (html) {
          var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("content");
          if (fresh && !busy()) {
            content.innerHTML = fresh.innerHTML;
            body.setAttribute("data-refreshed", String(Date.now()));
          }
        }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(schedule);
  }
  function schedule() { window.setTimeout(refresh, Math.max(every, 1) * 1000); }
  schedule();
})();
