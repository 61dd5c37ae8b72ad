// The page of `ddrs serve`: upload an image, see what the model sees, the certified answer
// and what it means. No external resources (the service may have no network).
"use strict";
const SERVICE = JSON.parse(document.getElementById("service").textContent);
const $ = (id) => document.getElementById(id);
const fixed = (v) => Number(v).toFixed(3);
const ALPHA = SERVICE.alpha;
const NORM = String(SERVICE.norm || "l2").toUpperCase();

function start() {
  document.querySelectorAll(".norm").forEach((span) => { span.textContent = NORM; });
  if (ALPHA !== undefined && ALPHA !== null) {
    $("confidence").textContent = "1 \u2212 \u03b1 = " + (1 - ALPHA) + " (\u03b1 = " + ALPHA + ")";
  }
  if (SERVICE.needs_token) {
    $("token-row").hidden = false;
    $("token").value = sessionStorage.getItem("ddrs-token") || "";
    $("token").addEventListener("input",
      () => sessionStorage.setItem("ddrs-token", $("token").value));
  }
  $("settings").textContent = SERVICE.settings
    ? Object.entries(SERVICE.settings).map(([k, v]) => k + ": " + JSON.stringify(v))
        .join(" \u00b7 ")
    : "\u03b1 = " + ALPHA + "; the other settings are shown to those with the token " +
      "(GET /health with it)";
  if (SERVICE.stateless) {
    $("stored").textContent = "This service keeps no memory: the same image gets the same " +
      "answer because its noise is drawn from the image itself.";
  }
  $("file").addEventListener("change", showUpload);
  $("upload").addEventListener("error", () => { $("upload-figure").hidden = true; });
  $("query").addEventListener("submit", send);
}

function showUpload() {
  const file = $("file").files[0];
  $("preview-figure").hidden = true;
  if (!file) { $("upload-figure").hidden = true; return; }
  $("upload").src = URL.createObjectURL(file);
  $("upload-figure").hidden = false;
}

function fail(text) { $("error").textContent = text; $("error").hidden = false; }

// what went wrong, in words (the service's own line where it has one)
function problem(status, body) {
  const said = body.error ? body.error.charAt(0).toUpperCase() + body.error.slice(1) + "." : "";
  if (status === 401) {
    return $("token").value
      ? "The token was not accepted: check it and send again."
      : "This service needs its token: enter it in the token field and send again.";
  }
  if (status === 408) return "The image took too long to arrive; try again.";
  if (status === 503) return "The service's memory is unavailable right now; try again in a moment.";
  if (status >= 500) return "The service failed on this image (its log has the details). " + said;
  return said || "The service refused the request (status " + status + ").";
}

function className(body) {
  if (body.predict === -1) return "abstain: no class is certain enough";
  const name = body.class_name && body.class_name !== String(body.predict)
    ? " (" + body.class_name + ")" : "";
  return "class " + body.predict + name;
}

function withProbability() {
  return ALPHA !== undefined && ALPHA !== null
    ? "probability at least " + (1 - ALPHA) + " over the sampling (\u03b1 = " + ALPHA + ")"
    : "probability at least 1 \u2212 \u03b1 over the sampling";
}

function memoryNote(body) {
  if (body.entry < 0) {
    return "This service keeps no memory: each answer is certified on its own (a fixed " +
      "sigma, or a router or a cascade that certifies its choice of expert), so it does not " +
      "depend on earlier queries, and the same image gets the same answer.";
  }
  if (body.repeat) {
    return "This exact image was answered before (memory entry " + body.entry + "), and the " +
      "same image always gets the same answer: this is the answer given then; nothing was " +
      "sampled again.";
  }
  if (body.changed) {
    return "The memory changed the class: this image lies inside an earlier answer's " +
      "certified ball, so it takes that answer (entry " + body.entry + ").";
  }
  if (body.shrunk) {
    return "The memory shrank the radius from " + fixed(body.mc_radius) + " to keep clear of " +
      "an earlier answer of another class (entry " + body.entry + ").";
  }
  return "Stored as memory entry " + body.entry + "; no earlier answer constrained it.";
}

function show(kind, body) {
  $("verdict").textContent = className(body);
  $("guarantee").textContent = body.predict === -1 ? "Nothing is certified for this image."
    : kind === "certify"
      ? "Certified radius " + fixed(body.radius) + ": every image within " + NORM + " distance " +
        fixed(body.radius) + " of this one (pixels in [0, 1]) gets this class, with " +
        withProbability() + "."
      : "predict certifies no radius: the class is the smoothed classifier's with " +
        withProbability() + ".";
  const before = (body.mc_predict === -1 ? "abstain" : "class " + body.mc_predict) +
    ", radius " + fixed(body.mc_radius) +
    (body.mc_radius > body.radius && body.shrunk ? " (shrunk by the memory, see below)" : "");
  const rows = [["certified radius", fixed(body.radius)], [NORM === "L1" ? "noise half-width lambda" : "noise level sigma", fixed(body.sigma)],
    [body.repeat ? "Monte Carlo answer (stored)" : "Monte Carlo answer, before the memory",
      before]];
  if (body.expert) rows.push(["expert", body.expert]);
  $("details").replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    for (const text of [k, v]) {
      const td = document.createElement("td");
      td.textContent = text; tr.appendChild(td);
    }
    return tr;
  }));
  $("memory").textContent = memoryNote(body);
  $("answer").hidden = false;
}

async function showPreview(form, headers) {
  try {
    const response = await fetch("/v1/preview", {method: "POST", body: form, headers});
    if (!response.ok) return;
    $("preview").src = URL.createObjectURL(await response.blob());
    $("preview-figure").hidden = false;
  } catch (error) { /* the answer's own request reports network errors */ }
}

async function send(event) {
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
    const preview = showPreview(form, headers);
    let response;
    try {
      response = await fetch("/v1/" + kind, {method: "POST", body: form, headers});
    } catch (error) {
      fail("The service could not be reached (network error: " + error.message + ").");
      return;
    }
    let body = {};
    try { body = await response.json(); } catch (error) { body = {}; }
    await preview;
    if (!response.ok) { fail(problem(response.status, body)); return; }
    show(kind, body);
  } finally {
    $("send").disabled = false; $("spinner").hidden = true;
  }
}

start();
