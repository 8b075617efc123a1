// The waiting page: asks where the open stands every two seconds, shows
// the place in line and the expected wait, and goes into the session as
// soon as it has a host. Without JavaScript the page refreshes itself.
(function () {
  var box = document.getElementById("queue");
  if (!box) return;
  var sid = box.dataset.sid;
  var position = document.getElementById("queue-position");
  var eta = document.getElementById("queue-eta");
  function ask() {
    fetch("/api/v1/sessions/" + sid, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (!body) return setTimeout(ask, 2000);
        if (body.state === "queued") {
          position.textContent = body.position;
          position.dataset.position = body.position;
          eta.textContent = body.wait_text;
          return setTimeout(ask, 2000);
        }
        if (body.url) return window.location.replace(body.url);
        // It left the queue without a place: the page says why.
        window.location.reload();
      })
      .catch(function () { setTimeout(ask, 2000); });
  }
  setTimeout(ask, 2000);
})();
