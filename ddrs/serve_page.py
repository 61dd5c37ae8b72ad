"""The page of `ddrs serve` (`/`): upload an image, see the certified answer and what it means.
Plain HTML and JavaScript, no external resources (the service may have no network)."""

from __future__ import annotations

import json

FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<circle cx="8" cy="8" r="7" fill="#2c6e49"/><circle cx="8" cy="8" r="3" fill="#fff"/>'
    b"</svg>"
)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ddrs: certified prediction</title>
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>
body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;
 line-height:1.45;color:#1b1b1b}
h1{font-size:1.5rem} form{display:flex;flex-wrap:wrap;gap:.6rem;align-items:center}
button{padding:.35rem 1.1rem} button:disabled{opacity:.5}
.spinner{width:1rem;height:1rem;border:3px solid #ccc;border-top-color:#2c6e49;
 border-radius:50%;animation:spin .8s linear infinite;display:inline-block}
@keyframes spin{to{transform:rotate(360deg)}}
[hidden]{display:none !important}
.error{color:#a4161a;font-weight:600} .class{font-size:1.4rem;font-weight:600}
td{padding:2px 10px 2px 0;vertical-align:top} .note{color:#555;font-size:.9rem}
.settings{font-family:monospace;font-size:.8rem;overflow-wrap:anywhere;word-break:break-word}
</style></head>
<body>
<h1>ddrs: certified prediction</h1>
<p><b>certify</b> answers a class and a <em>certified radius</em>: no change of the image
smaller than that radius (L2 distance, pixels in [0, 1]) can change the answer.
<b>predict</b> answers a class only (radius 0), with fewer guarantees and less work. Every
answer is kept in the service's memory, so the same image always gets the same answer.</p>
<form id="query">
  <input type="file" id="file" accept="image/*" aria-label="image file">
  <select id="kind" aria-label="query"><option>certify</option><option>predict</option></select>
  <span id="token-row" hidden><label>token
    <input type="password" id="token" autocomplete="off" size="18"></label>
    <span class="note">this service needs a token (kept for this browser session)</span></span>
  <button id="send" type="submit">Send</button>
  <span id="spinner" class="spinner" role="status" aria-label="waiting for the answer" hidden>
  </span>
</form>
<p id="error" class="error" role="alert" hidden></p>
<section id="answer" hidden>
  <p class="class" id="verdict"></p>
  <p id="guarantee"></p>
  <table id="details"></table>
  <p id="memory" class="note"></p>
</section>
<details id="about"><summary>Service settings</summary>
  <p id="settings" class="settings"></p></details>
<script>
const SERVICE = {{DESCRIBE}};
const NEEDS_TOKEN = {{NEEDS_TOKEN}};
const $ = (id) => document.getElementById(id);
const fixed = (v) => Number(v).toFixed(3);
if (NEEDS_TOKEN) {
  $("token-row").hidden = false;
  $("token").value = sessionStorage.getItem("ddrs-token") || "";
  $("token").addEventListener("input",
    () => sessionStorage.setItem("ddrs-token", $("token").value));
  $("settings").textContent = "shown to those with the token (GET /health with it)";
} else {
  $("settings").textContent = Object.entries(SERVICE).map(([k, v]) =>
    k + ": " + JSON.stringify(v)).join(" \\u00b7 ");
}
function fail(text) { $("error").textContent = text; $("error").hidden = false; }
function className(body) {
  if (body.predict === -1) return "abstain: no class is certain enough";
  const name = body.class_name && body.class_name !== String(body.predict)
    ? " (" + body.class_name + ")" : "";
  return "class " + body.predict + name;
}
function show(kind, body) {
  $("verdict").textContent = className(body);
  const alpha = SERVICE.alpha !== undefined ? " (1 - alpha = " + (1 - SERVICE.alpha) + ")" : "";
  $("guarantee").textContent = body.predict === -1 ? "Nothing is certified for this image."
    : kind === "certify"
      ? "Certified radius " + fixed(body.radius) + ": every image within L2 distance " +
        fixed(body.radius) + " of this one (pixels in [0, 1]) gets this class, with " +
        "probability at least 1 - alpha over the sampling" + alpha + "."
      : "predict certifies no radius: the class is the smoothed classifier's with " +
        "probability at least 1 - alpha" + alpha + ".";
  const rows = [["certified radius", fixed(body.radius)], ["noise level sigma", fixed(body.sigma)],
    ["before the memory", (body.mc_predict === -1 ? "abstain" : "class " + body.mc_predict) +
      ", radius " + fixed(body.mc_radius)]];
  if (body.expert) rows.push(["expert", body.expert]);
  $("details").replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    for (const text of [k, v]) { const td = document.createElement("td");
      td.textContent = text; tr.appendChild(td); }
    return tr; }));
  $("memory").textContent = body.repeat
    ? "This exact image was answered before (memory entry " + body.entry + "): the stored answer."
    : body.changed ? "The memory changed the class: this image lies inside an earlier answer's " +
      "certified ball, so it takes that answer (entry " + body.entry + ")."
    : body.shrunk ? "The memory shrank the radius from " + fixed(body.mc_radius) + " to keep " +
      "clear of an earlier answer of another class (entry " + body.entry + ")."
    : "Stored as memory entry " + body.entry + "; no earlier answer constrained it.";
  $("answer").hidden = false;
}
$("query").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").hidden = true; $("answer").hidden = true;
  const file = $("file").files[0];
  if (!file) { fail("Choose an image file first."); return; }
  const kind = $("kind").value;
  const form = new FormData(); form.append("file", file);
  const headers = {};
  if ($("token").value) headers["Authorization"] = "Bearer " + $("token").value;
  $("send").disabled = true; $("spinner").hidden = false;
  try {
    let response;
    try {
      response = await fetch("/v1/" + kind, {method: "POST", body: form, headers});
    } catch (error) {
      fail("The service could not be reached (network error: " + error.message + ").");
      return;
    }
    let body = {};
    try { body = await response.json(); } catch (error) { body = {}; }
    if (!response.ok) {
      const hint = response.status === 401 ? " Enter the service's token." : "";
      fail("Error " + response.status + ": " + (body.error || response.statusText) + hint);
      return;
    }
    show(kind, body);
  } finally {
    $("send").disabled = false; $("spinner").hidden = true;
  }
});
</script></body></html>
"""


def render_page(describe: dict, needs_token: bool) -> str:
    """The page with the service's settings (none when a token is needed), safe in <script>."""
    shown = {} if needs_token else describe
    return (PAGE.replace("{{DESCRIBE}}", json.dumps(shown).replace("<", "\\u003c"))
            .replace("{{NEEDS_TOKEN}}", "true" if needs_token else "false"))
