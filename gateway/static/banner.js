// Added by the OpenCloud gateway to Lab's page: asks every 30 s whether the
// owner's compute time runs out soon and, while it does, shows a banner
// with a link to buy more. It never reads or changes anything of Lab's.
(function () {
  "use strict";
  var ID = "oc-balance-banner";
  function show(notice) {
    var banner = document.getElementById(ID);
    if (!notice || !notice.warning) {
      if (banner) banner.remove();
      return;
    }
    if (!banner) {
      banner = document.createElement("div");
      banner.id = ID;
      banner.setAttribute("role", "alert");
      banner.style.cssText =
        "position:fixed;top:0;left:0;right:0;z-index:2147483647;padding:8px 16px;" +
        "background:#fff4e5;color:#8a4b00;border-bottom:1px solid #f0c98a;" +
        "font:14px/1.4 system-ui,sans-serif;text-align:center";
      document.body.appendChild(banner);
    }
    banner.textContent = notice.warning + " ";
    var link = document.createElement("a");
    link.href = notice.packages_url;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = "Buy compute time";
    link.style.color = "#8a4b00";
    link.style.fontWeight = "600";
    banner.appendChild(link);
  }
  function ask() {
    fetch("/_oc/balance", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(show)
      .catch(function () {});
  }
  ask();
  setInterval(ask, 30000);
})();
