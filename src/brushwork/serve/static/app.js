// The brushwork web page: submit jobs to /v1/generate, follow their server-sent events (read with fetch so
// the API key header can be sent), show previews, collect results in the gallery; live mode over /v1/live.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form");
const message = $("message");
let apiKey = localStorage.getItem("brushwork-api-key") || "";
let info = null;

function headers(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    $("key-row").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    let text = `${response.status} ${response.statusText}`;
    try {
      text = (await response.json()).error.message;
    } catch (_) { /* not a JSON error body */ }
    throw new Error(text);
  }
  return response;
}

function say(text, isError = false) {
  message.textContent = text;
  message.classList.toggle("error", isError);
}

async function loadInfo() {
  try {
    info = await (await api("/v1/info")).json();
    $("model").textContent = `model ${info.model} · ${info.default_size}×${info.default_size}` +
      (info.watermark ? " · watermarked" : "");
    $("steps").value = info.defaults.steps;
    $("steps").max = info.limits.steps;
    $("guidance").value = info.defaults.guidance;
    $("guidance").max = info.limits.guidance;
    $("count").max = info.limits.n;
    $("seed").max = info.limits.seed;
    $("layout-row").hidden = !info.layout;
    $("best-of").max = info.limits.best_of;
    $("best-of-row").hidden = info.limits.best_of < 2;
    say("");
  } catch (error) {
    say(error.message, true);
  }
}

function readForm() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    steps: parseInt($("steps").value, 10),
    guidance: parseFloat($("guidance").value),
    n: parseInt($("count").value, 10),
  };
  if ($("seed").value.trim() !== "") body.seed = parseInt($("seed").value, 10);
  if ($("layout").checked) body.layout = true;
  const bestOf = parseInt($("best-of").value, 10);
  if (bestOf > 1) body.best_of = bestOf;
  return body;
}

function addJobCard(job) {
  const card = $("job-template").content.firstElementChild.cloneNode(true);
  card.dataset.jobId = job.id;
  card.querySelector(".job-prompt").textContent = job.request.prompt || "(empty prompt)";
  card.querySelector(".cancel").addEventListener("click", async () => {
    try {
      await api(`/v1/jobs/${job.id}`, { method: "DELETE" });
    } catch (error) {
      say(error.message, true);
    }
  });
  $("jobs").prepend(card);
  return card;
}

function showProgress(card, update) {
  const state = card.querySelector(".job-state");
  if (update.state === "queued") {
    state.textContent = update.queue_position ? `queued (position ${update.queue_position})` : "queued";
  } else {
    state.textContent = `step ${update.step} of ${update.steps}`;
    card.querySelector("progress").value = update.step / update.steps;
  }
  if (update.preview) card.querySelector(".preview").src = update.preview;
}

async function addResults(job) {
  // Newest first: prepend the last image first so the job's images keep their order.
  for (const image of [...job.images].reverse()) {
    const blob = await (await api(image.url)).blob();
    const url = URL.createObjectURL(blob);
    const figure = $("image-template").content.firstElementChild.cloneNode(true);
    figure.querySelector("img").src = url;
    figure.querySelector(".parameters").textContent = image.parameters;
    const link = figure.querySelector(".download");
    link.href = url;
    link.download = `brushwork-${job.id}-${image.index}.png`;
    $("gallery").prepend(figure);
  }
}

function finish(card, job) {
  card.querySelector(".cancel").hidden = true;
  card.classList.add(job.state);
  if (job.state === "succeeded") {
    card.remove();
    return addResults(job);
  }
  card.querySelector(".job-state").textContent = job.error ? `${job.state}: ${job.error}` : job.state;
}

// Server-sent events over fetch: EventSource cannot send an Authorization header.
async function follow(job, card) {
  const response = await api(`/v1/jobs/${job.id}/events`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      const payload = JSON.parse(data);
      if (name === "progress") showProgress(card, payload);
      if (name === "done") return finish(card, payload);
    }
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  let job;
  try {
    job = await (await api("/v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(readForm()),
    })).json();
  } catch (error) {
    say(error.message, true);
    return;
  }
  say("");
  const card = addJobCard(job);
  try {
    await follow(job, card);
  } catch (error) {
    card.querySelector(".job-state").textContent = `lost track of the job: ${error.message}`;
  }
});

// Live mode: every edit of the prompt goes to /v1/live after a short debounce; the server renders the latest
// message and drops the ones a newer one replaced, so the page just shows whatever frame comes back.
const LIVE_DEBOUNCE_MS = 15;
let live = null; // { socket, keyAt: Map("prompt\0seed" -> time of the edit) }
let liveTimer = 0;
let lastEdit = 0;
window.liveFrames = []; // { prompt, ms (server), total (edit to image on screen), at }, for benchmarks

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

function liveProtocols() {
  // A browser WebSocket cannot send an Authorization header: the key travels as a subprotocol.
  if (!apiKey) return ["brushwork"];
  const bytes = new TextEncoder().encode(apiKey);
  const encoded = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return ["brushwork", `bearer.${encoded}`];
}

function startLive() {
  if ($("seed").value.trim() === "") $("seed").value = randomSeed();
  if (info) $("steps").value = info.defaults.live_steps;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/v1/live`, liveProtocols());
  live = { socket, keyAt: new Map() };
  socket.addEventListener("open", () => sendLive());
  socket.addEventListener("message", (event) => showLiveFrame(JSON.parse(event.data)));
  socket.addEventListener("close", (event) => {
    if (!live || live.socket !== socket) return;
    live = null;
    $("live").checked = false;
    if (event.code !== 1000 && !message.classList.contains("error")) say(`live mode closed (${event.code})`, true);
  });
  $("live-panel").hidden = false;
}

function stopLive() {
  if (live) {
    const socket = live.socket;
    live = null;
    socket.close(1000);
  }
  if (info) $("steps").value = info.defaults.steps;
  $("live-panel").hidden = true;
}

function liveEdited() {
  if (!live) return;
  lastEdit = performance.now();
  clearTimeout(liveTimer);
  liveTimer = setTimeout(sendLive, LIVE_DEBOUNCE_MS);
}

function sendLive() {
  if (!live || live.socket.readyState !== WebSocket.OPEN) return;
  const body = { prompt: $("prompt").value, seed: parseInt($("seed").value, 10) || 0 };
  const steps = parseInt($("steps").value, 10);
  if (steps > 0) body.steps = steps;
  live.keyAt.set(`${body.prompt}\0${body.seed}`, lastEdit || performance.now());
  live.socket.send(JSON.stringify(body));
}

function showLiveFrame(frame) {
  if (frame.error) {
    if (frame.error.type === "authentication_error") $("key-row").hidden = false;
    say(frame.error.message, true);
    return;
  }
  if (!live) return;
  const key = `${frame.prompt}\0${frame.seed}`;
  const editedAt = live.keyAt.get(key);
  for (const sent of live.keyAt.keys()) { // forget this edit and the ones before it
    live.keyAt.delete(sent);
    if (sent === key) break;
  }
  const image = $("live-image");
  image.src = `data:image/png;base64,${frame.image}`;
  image.dataset.prompt = frame.prompt;
  image.decode().then(() => {
    const total = editedAt === undefined ? NaN : performance.now() - editedAt;
    window.liveFrames.push({ prompt: frame.prompt, ms: frame.ms, total, at: performance.now() });
    $("live-ms").textContent = `${frame.ms.toFixed(0)} ms to render` +
      (Number.isNaN(total) ? "" : ` · ${total.toFixed(0)} ms from keystroke to screen`);
  }).catch(() => {});
  say("");
}

$("live").addEventListener("change", () => ($("live").checked ? startLive() : stopLive()));
for (const id of ["prompt", "seed", "steps"]) $(id).addEventListener("input", liveEdited);

$("dice").addEventListener("click", () => {
  $("seed").value = randomSeed();
  liveEdited();
});

$("api-key").addEventListener("change", () => {
  apiKey = $("api-key").value.trim();
  localStorage.setItem("brushwork-api-key", apiKey);
  loadInfo();
  if (live) {
    stopLive();
    $("live").checked = true;
    startLive();
  }
});

loadInfo();
