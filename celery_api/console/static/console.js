// The console's only script (no inline script: the Content-Security-Policy allows
// this file only). Times in the viewer's zone, confirmations, live regions, a run's
// progress (its event stream, or polling when that fails), and the viewer's UTC
// offset for date-time fields.
"use strict";

(function () {
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var d = new Date(el.getAttribute("datetime"));
      if (isNaN(d)) return;
      el.textContent = d.toLocaleString(undefined, {
        year: "numeric", month: "short", day: "2-digit",
        hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
      });
    });
  }

  function confirmations() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
      });
    });
  }

  function offsets() {
    // date-time-local fields are in the viewer's zone: the server gets the offset.
    document.querySelectorAll("form[data-tz-form]").forEach(function (form) {
      form.addEventListener("submit", function () {
        var field = form.querySelector("input[type=datetime-local]:not([value=''])");
        var when = field && field.value ? new Date(field.value) : new Date();
        var offset = form.querySelector("input[name=tz_offset]");
        if (offset) offset.value = String(isNaN(when) ? new Date().getTimezoneOffset()
                                                      : when.getTimezoneOffset());
      });
    });
  }

  // Once a form is sent, the page is leaving: no more polling, and an answer still on
  // its way is dropped. (A run's page that saw its run finish reloaded itself, and
  // that reload replaced the navigation of the revoke or retry just sent.)
  var leaving = false;
  document.addEventListener("submit", function (event) {
    if (event.defaultPrevented) return;  // a confirmation said no
    leaving = true;
    document.documentElement.setAttribute("data-polling", "stopped");
  });

  function poll(url, every, apply) {
    var busy = false;
    function tick() {
      if (document.hidden || busy || leaving) return;
      busy = true;
      fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html, application/json"}})
        .then(function (response) {
          if (leaving) return null;
          if (response.status === 401) { window.location.reload(); return null; }
          return response.headers.get("Content-Type").indexOf("json") >= 0
            ? response.json() : response.text();
        })
        .then(function (body) { if (body !== null && !leaving) apply(body); })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { busy = false; });
    }
    return window.setInterval(tick, every);
  }

  function liveRegions() {
    document.querySelectorAll("[data-live-url]").forEach(function (el) {
      var every = parseInt(el.getAttribute("data-live-every"), 10) || 2000;
      var last = null;
      poll(el.getAttribute("data-live-url"), every, function (html) {
        if (typeof html !== "string") return;
        // Replaced only when it changed: focus and selection stay put otherwise.
        if (html !== last) {
          last = html;
          el.innerHTML = html;
          localTimes(el);
        }
        el.setAttribute("data-refreshed", String(Date.now()));
      });
    });
  }

  function runState() {
    var section = document.querySelector("[data-run-state-url]");
    if (!section || section.getAttribute("data-finished") === "1") return;
    var done = false;
    function apply(state) {
      if (done || leaving) return;
      var status = document.getElementById("run-status");
      status.innerHTML = "";
      var badge = document.createElement("span");
      badge.className = "status status-" + state.status.toLowerCase();
      badge.textContent = state.status;
      status.appendChild(badge);
      var p = state.progress;
      var box = document.getElementById("run-progress");
      if (p && p.total) {
        box.hidden = false;
        var bar = document.getElementById("run-progress-bar");
        bar.max = p.total;
        bar.value = p.current || 0;
        bar.textContent = (p.percent || 0) + "%";
        document.getElementById("run-progress-text").textContent =
          p.current + " / " + p.total + (p.message ? " · " + p.message : "");
      }
      document.getElementById("run-worker").textContent = state.worker || "—";
      document.getElementById("run-attempts").textContent = String(state.attempts || 0);
      if (state.finished) {
        done = true;
        stop();
        document.documentElement.setAttribute("data-polling", "finished");
        window.location.reload();  // the result, error and actions come with the page
      }
    }
    var timer = null, stream = null;
    function stop() {
      if (timer !== null) window.clearInterval(timer);
      if (stream !== null) stream.close();
    }
    function fallBack() {
      // The stream was refused or cannot be opened: poll the state instead.
      if (stream !== null) { stream.close(); stream = null; }
      if (timer === null && !done && !leaving) {
        document.documentElement.setAttribute("data-live", "polling");
        timer = poll(section.getAttribute("data-run-state-url"), 500, apply);
      }
    }
    var streamUrl = section.getAttribute("data-run-events-url");
    if (!streamUrl || typeof window.EventSource !== "function") { fallBack(); return; }
    // The server's event stream: each event carries the whole state. It ends when the
    // run finishes, or after the server's longest stream (the browser reconnects with
    // Last-Event-ID by itself); an answer other than a stream closes it for good.
    stream = new EventSource(streamUrl);
    stream.addEventListener("open", function () {
      document.documentElement.setAttribute("data-live", "stream");
    });
    ["status", "progress"].forEach(function (name) {
      stream.addEventListener(name, function (event) {
        try { apply(JSON.parse(event.data)); } catch (e) { /* the next event */ }
      });
    });
    stream.addEventListener("error", function () {
      if (stream !== null && stream.readyState === EventSource.CLOSED) fallBack();
    });
    document.addEventListener("submit", function (event) {
      if (!event.defaultPrevented) stop();  // leaving: see above
    });
  }

  function phoneLayout() {
    // On a phone the filters start folded (unless some are applied).
    if (!window.matchMedia("(max-width: 640px)").matches) return;
    document.querySelectorAll("details[data-close-on-phone]").forEach(function (el) {
      el.open = false;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    phoneLayout();
    localTimes(document);
    confirmations();
    offsets();
    liveRegions();
    runState();
  });
})();
