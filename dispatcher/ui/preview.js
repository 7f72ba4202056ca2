// Live refresh: the page carries the version it was rendered at; poll /version once a second
// and reload when a template, layout, sample or captured message has changed since.
// The pages work without this script; it only saves pressing reload.
(function () {
  "use strict";
  const meta = document.querySelector('meta[name="dispatcher-version"]');
  if (!meta) {
    return;
  }
  const rendered = meta.content;
  async function poll() {
    try {
      const response = await fetch("/version", { cache: "no-store" });
      if (response.ok && (await response.text()) !== rendered) {
        window.location.reload();
        return;
      }
    } catch (error) {
      // The server is restarting or stopped: keep trying quietly.
    }
    window.setTimeout(poll, 1000);
  }
  window.setTimeout(poll, 1000);
})();
