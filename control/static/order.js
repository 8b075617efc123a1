// The return page: asks for the order until its payment is in, then shows
// it without a reload. Without JavaScript the page refreshes itself.
(function () {
  var box = document.getElementById("order-status");
  if (!box || box.dataset.paid === "true") return;
  var id = box.dataset.order;
  var tries = 0;
  function ask() {
    tries += 1;
    fetch("/api/v1/orders/" + id, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (body && body.paid) {
          box.dataset.paid = "true";
          box.className = "alert alert-ok";
          document.getElementById("order-message").textContent = body.message;
          var balance = document.getElementById("order-balance");
          if (balance) balance.textContent = body.balance_text || balance.textContent;
          var next = document.getElementById("order-next");
          if (next) next.hidden = false;
          return;
        }
        if (body) document.getElementById("order-message").textContent = body.message;
        if (tries < 600) setTimeout(ask, tries < 20 ? 250 : 1000);
      })
      .catch(function () { if (tries < 600) setTimeout(ask, 1000); });
  }
  ask();
})();
