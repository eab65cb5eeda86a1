// The brushwork web page: submit jobs to /v1/generate, follow their server-sent events (read with fetch so
// the API key header can be sent), show previews, collect results in the gallery.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("form");
const message = $("message");
let apiKey = localStorage.getItem("brushwork-api-key") || "";

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
    const info = await (await api("/v1/info")).json();
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

$("dice").addEventListener("click", () => {
  $("seed").value = crypto.getRandomValues(new Uint32Array(1))[0];
});

$("api-key").addEventListener("change", () => {
  apiKey = $("api-key").value.trim();
  localStorage.setItem("brushwork-api-key", apiKey);
  loadInfo();
});

loadInfo();
