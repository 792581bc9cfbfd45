// queuectl dashboard: live updates by polling, one request at a time.
//
// Each page's live part (<main id="live" data-poll>) is fetched again with the ledger head
// it was built at as If-None-Match: an unchanged queue answers 304 and nothing is redrawn.
// The next poll is timed only once the last one has finished (a slow server is never
// asked twice at once). Polling stops while the tab is hidden, while a confirm step is
// open and while the user is typing in the live part. The interval is kept in
// localStorage; "Off" stops it.
"use strict";

(function () {
  const KEY = "queuectl.poll-interval";
  const CHOICES = ["0", "1", "2", "5", "15"];
  const DEFAULT = "2";
  const live = document.getElementById("live");
  const select = document.getElementById("poll-interval");
  const status = document.getElementById("poll-status");
  let etag = live ? live.dataset.etag : null;
  let timer = null;
  let polling = false;

  function seconds() {
    let chosen = null;
    try { chosen = window.localStorage.getItem(KEY); } catch (e) { /* storage refused */ }
    return Number(CHOICES.includes(chosen) ? chosen : DEFAULT);
  }

  function held() {
    if (document.hidden) return true;
    if (document.querySelector("details.confirm[open]")) return true;
    const focused = document.activeElement;
    return Boolean(focused && live.contains(focused) &&
                   ["INPUT", "SELECT", "TEXTAREA"].includes(focused.tagName));
  }

  function schedule() {
    window.clearTimeout(timer);
    timer = null;
    const every = seconds();
    if (live && live.dataset.poll && every > 0 && !polling && !document.hidden) {
      timer = window.setTimeout(poll, every * 1000);
    }
  }

  function say(text) {
    if (status) status.textContent = text;
  }

  async function poll() {
    timer = null;
    if (held()) { schedule(); return; }
    polling = true;
    try {
      const headers = { "X-Poll": "1" };
      if (etag) headers["If-None-Match"] = etag;
      const response = await fetch(window.location.pathname + window.location.search,
                                   { headers: headers, cache: "no-store", credentials: "same-origin" });
      if (response.status === 200) {
        const html = await response.text();
        if (!held()) {
          live.innerHTML = html;
          etag = response.headers.get("ETag");
          live.dataset.etag = etag || "";
        }
        say("");
      } else if (response.status === 304) {
        say("");
      } else {
        say("refresh failed: HTTP " + response.status);
      }
    } catch (e) {
      say("refresh failed: server unreachable");
    } finally {
      polling = false;
      schedule();
    }
  }

  if (select) {
    select.value = String(seconds());
    select.addEventListener("change", function () {
      try { window.localStorage.setItem(KEY, select.value); } catch (e) { /* kept for this page only */ }
      schedule();
    });
  }
  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { window.clearTimeout(timer); timer = null; }
    else if (!polling && seconds() > 0) { poll(); }
  });
  // A confirm step closed: polling resumes from now.
  document.addEventListener("toggle", function (event) {
    if (event.target.matches && event.target.matches("details.confirm")) schedule();
  }, true);
  schedule();

  // A running job's output (<pre id="live-output" data-src>): what was written since the
  // chunk it shows last is fetched every second and appended, kept at the bottom if the
  // reader was there. A redraw of the live part brings a new <pre>, read on from there.
  const KEEP = 262144;  // characters a page holds at most; older output is cut
  async function follow() {
    const pre = document.getElementById("live-output");
    if (!pre || document.hidden || seconds() === 0) return window.setTimeout(follow, 1000);
    try {
      const url = pre.dataset.src + "&seq=" + pre.dataset.seq + "&end=" + pre.dataset.end;
      const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
      if (response.status === 200) {
        const got = await response.json();
        if (document.getElementById("live-output") === pre && got.seq > Number(pre.dataset.seq)) {
          const bottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
          let text = pre.textContent + got.text;
          if (text.length > KEEP) text = text.slice(text.length - KEEP);
          pre.textContent = text;
          pre.dataset.seq = String(got.seq);
          pre.dataset.end = String(got.end);
          if (bottom) pre.scrollTop = pre.scrollHeight;
        }
      }
    } catch (e) { /* the page's own poll says when the server is unreachable */ }
    window.setTimeout(follow, 1000);
  }
  if (document.getElementById("live-output") || (live && live.dataset.poll)) follow();
})();
