// The page of `imagetx serve`: plain JavaScript over the server's HTTP API (docs/serve.md).
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
let MODELS = [];
const running = {};  // tab -> AbortController of its request: aborting it disconnects, which stops the server's work

function showError(message) {
  $("#error").textContent = message ? `error: ${message}` : "";
}

// ---- drawing PNG data URLs onto canvases, enlarged without smoothing --------------------------------
function scaleFor(height) { return Math.max(1, Math.floor(168 / height)); }

function paint(canvas, url, scale) {
  const ticket = (canvas._ticket = (canvas._ticket || 0) + 1);  // a later frame wins over a slower earlier one
  const image = new Image();
  image.onload = () => {
    if (ticket !== canvas._ticket) return;
    canvas.width = image.width * scale;
    canvas.height = image.height * scale;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    canvas.dataset.painted = String(ticket);
  };
  image.src = url;
}

function card(container, index, caption) {
  let div = container.children[index];
  if (!div) {
    div = document.createElement("figure");
    div.className = "card";
    div.innerHTML = '<canvas class="image"></canvas><canvas class="bits"></canvas><figcaption></figcaption>';
    container.appendChild(div);
  }
  if (caption !== undefined) $("figcaption", div).textContent = caption;
  return div;
}

// ---- server-sent events from a POST (EventSource only does GET) ----------------------------------
async function postEvents(url, body, headers, onEvent, signal) {
  const response = await fetch(url, { method: "POST", body, headers, signal });
  if (!response.ok) {
    const answer = await response.json().catch(() => ({ error: response.statusText }));
    throw new Error(answer.error);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(event, JSON.parse(data));
    }
  }
}

// One generation request of a tab: frames fill its cards and progress bar, `result` finishes them.
async function generate(tab, url, body, headers, scale, captions) {
  if (running[tab]) running[tab].abort();
  const controller = (running[tab] = new AbortController());
  const progress = $(`#${tab}-progress`), status = $(`#${tab}-status`), results = $(`#${tab}-results`);
  results.replaceChildren();
  progress.value = 0;
  progress.max = 1;
  status.textContent = "waiting";
  showError("");
  const accepted = [];
  try {
    await postEvents(url, body, headers, (event, data) => {
      if (event === "notes" && data.notes.length) status.textContent = data.notes.join("; ");
      if (event === "frame") {
        progress.max = data.total;
        progress.value = data.done;
        accepted.push(...data.accepted);
        const parallel = accepted.some((a) => a > 1);
        status.textContent = `${data.done} / ${data.total} positions, ${data.passes} ${parallel ? "passes" : "steps"}` +
          (parallel ? `; positions accepted per pass: ${accepted.slice(-24).join(" ")}` : "");
        data.images.forEach((url, i) => {
          const div = card(results, i);
          paint($("canvas.image", div), url, scale);
          paint($("canvas.bits", div), data.bits[i], scale);
        });
      }
      if (event === "result") {
        progress.value = progress.max;
        const mean = accepted.length ? (accepted.reduce((a, b) => a + b, 0) / accepted.length).toFixed(2) : "1";
        status.textContent = `done: ${data.images.length} images in ${data.seconds} s, ${data.decode} decoding, ` +
          `${data.passes} ${data.decode === "parallel" ? `passes (${mean} positions accepted per pass)` : "steps"}`;
        data.images.forEach((url, i) => {
          const div = card(results, i, captions(data, i));
          paint($("canvas.image", div), url, scale);
          paint($("canvas.bits", div), data.bits[i], scale);
        });
      }
      if (event === "error") throw new Error(data.error);
    }, controller.signal);
  } catch (error) {
    status.textContent = error.name === "AbortError" ? "stopped" : "failed";
    if (error.name !== "AbortError") showError(error.message);
  } finally {
    if (running[tab] === controller) delete running[tab];
  }
}

function fields(form) {
  const model = MODELS.find((m) => m.name === form.elements.model.value);
  const values = { model: model.name };
  for (const name of ["n", "temperature", "seed"]) if (form.elements[name]) values[name] = Number(form.elements[name].value);
  if (form.elements.decode) values.decode = form.elements.decode.value;
  const label = form.elements.label.value;
  if (label !== "") values.label = Number(label);
  return { model, values };
}

function formData(values) {
  const data = new FormData();
  for (const [key, value] of Object.entries(values)) data.append(key, String(value));
  return data;
}

const fmt = (x, digits) => (x === null ? "infinite" : x.toFixed(digits));  // JSON has no infinity
const bpdCaption = (data, i) => `${fmt(data.bpd[i], 3)} bits/dim` + (data.labels ? `, class ${data.labels[i]}` : "");

// ---- Sample ---------------------------------------------------------------------------------
$("#sample-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const { model, values } = fields(event.target);
  generate("sample", "/api/sample/stream", JSON.stringify(values), { "content-type": "application/json" },
           scaleFor(model.image_size[0]), bpdCaption);
});

// ---- Complete: a drawing canvas at the model's size, and the region to keep ----------------------
const draw = $("#draw"), mask = $("#mask");

function setDrawingSize() {
  const model = MODELS.find((m) => m.name === $("#complete-form").elements.model.value);
  if (!model) return;
  const [h, w] = model.image_size, scale = scaleFor(h);
  for (const canvas of [draw, mask]) {
    canvas.width = w;
    canvas.height = h;
    canvas.style.width = `${w * scale}px`;
    canvas.style.height = `${h * scale}px`;
  }
  clearCanvas(draw, "#000000");
  clearCanvas(mask, null);
  $("#complete-rows").max = h - 1;
  $("#complete-rows").value = Math.floor(h / 2);
}

function clearCanvas(canvas, color) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (color) { ctx.fillStyle = color; ctx.fillRect(0, 0, canvas.width, canvas.height); }
}

let brushDown = false;
function brush(event) {
  if (!brushDown) return;
  const rect = mask.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * draw.width;
  const y = ((event.clientY - rect.top) / rect.height) * draw.height;
  const painting = document.querySelector("input[name=keep]:checked").value === "mask";
  const ctx = (painting ? mask : draw).getContext("2d");
  ctx.fillStyle = painting ? "rgba(0, 255, 0, 0.6)" : $("#brush-color").value;
  const size = Number($("#brush-size").value);
  ctx.fillRect(Math.floor(x - size / 2), Math.floor(y - size / 2), size, size);
}
mask.addEventListener("pointerdown", (e) => { brushDown = true; brush(e); });
mask.addEventListener("pointermove", brush);
window.addEventListener("pointerup", () => { brushDown = false; });
$("#draw-clear").addEventListener("click", () => clearCanvas(draw, "#000000"));
$("#mask-clear").addEventListener("click", () => clearCanvas(mask, null));

$("#complete-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const image = new Image();
  image.onload = () => {  // shown centre-cropped to the model's shape; the server fits the file itself
    const side = Math.min(image.width / draw.width, image.height / draw.height);
    const sw = draw.width * side, sh = draw.height * side;
    draw.getContext("2d").drawImage(image, (image.width - sw) / 2, (image.height - sh) / 2, sw, sh, 0, 0, draw.width, draw.height);
    URL.revokeObjectURL(image.src);
  };
  image.src = URL.createObjectURL(file);
});

function canvasBlob(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function maskBlob() {  // the painted region in white on black, at the model's size
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext("2d");
  const painted = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const image = ctx.createImageData(mask.width, mask.height);
  for (let i = 0; i < painted.data.length; i += 4) {
    const on = painted.data[i + 3] > 0 ? 255 : 0;
    image.data.set([on, on, on, 255], i);
  }
  ctx.putImageData(image, 0, 0);
  return canvasBlob(out);
}

$("#complete-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("#complete-status").textContent = "waiting";  // at once: the canvases are encoded first
  const { model, values } = fields(event.target);
  const keep = document.querySelector("input[name=keep]:checked").value;
  if (keep === "rows") values.rows = Number($("#complete-rows").value);
  const data = formData(values);
  data.append("image", await canvasBlob(draw), "drawing.png");
  if (keep === "mask") data.append("mask", await maskBlob(), "mask.png");
  generate("complete", "/api/complete/stream", data, {}, scaleFor(model.image_size[0]), bpdCaption);
});
$("#complete-form").elements.model.addEventListener("change", setDrawingSize);

// ---- Super-resolve --------------------------------------------------------------------------
$("#superres-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const { model, values } = fields(form);
  if (!form.elements.image.files[0]) { showError("choose a low-resolution image first"); return; }
  values.consistent = form.elements.consistent.checked;
  const data = formData(values);
  data.append("image", form.elements.image.files[0]);
  const inputs = $("#superres-inputs"), scale = scaleFor(model.image_size[0]);
  inputs.replaceChildren();
  generate("superres", "/api/superres/stream", data, {}, scale, (result, i) => {
    if (i === 0) {
      for (const [key, name] of [["input", "input (nearest)"], ["bicubic", "bicubic"]]) {
        const div = card(inputs, inputs.children.length, name);
        paint($("canvas.image", div), result[key], scale);
        $("canvas.bits", div).remove();
      }
    }
    return `${fmt(result.bpd[i], 3)} bits/dim; consistency ${fmt(result.consistency[i], 2)} (0 = exact)`;
  });
});

// ---- Likelihood -----------------------------------------------------------------------------
$("#likelihood-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const { model, values } = fields(form);
  if (!form.elements.image.files[0]) { showError("choose an image first"); return; }
  const data = formData(values);
  data.append("image", form.elements.image.files[0]);
  showError("");
  const response = await fetch("/api/likelihood", { method: "POST", body: data });
  const answer = await response.json();
  if (!response.ok) { showError(answer.error); return; }
  $("#likelihood-bpd").textContent = `${fmt(answer.bpd, 4)} bits/dim (${fmt(answer.bits, 1)} bits over ` +
    `${answer.dims} sub-pixels)` + (answer.notes.length ? `; ${answer.notes.join("; ")}` : "");
  const results = $("#likelihood-results"), scale = scaleFor(model.image_size[0]);
  results.replaceChildren();
  const div = card(results, 0, "the image, and the bits each sub-pixel cost");
  paint($("canvas.image", div), answer.image, scale);
  paint($("canvas.bits", div), answer.surprisal, scale);
});

// ---- models, classes, tabs ------------------------------------------------------------------
function fillClasses(form) {
  const model = MODELS.find((m) => m.name === form.elements.model.value);
  const select = form.elements.label;
  select.replaceChildren();
  const required = form.id !== "sample-form" && form.id !== "complete-form";
  if (!model || !model.num_classes) {
    select.add(new Option("none", ""));
    select.disabled = true;
    return;
  }
  select.disabled = false;
  if (!required) select.add(new Option("each in turn", ""));
  for (let k = 0; k < model.num_classes; k++) select.add(new Option(String(k), String(k)));
}

async function loadModels() {
  MODELS = await (await fetch("/api/models")).json();
  $("#models-note").textContent = MODELS.map((m) => `${m.name}: ${m.kind}, ${m.image_size.join("x")}`).join(" · ");
  for (const form of document.querySelectorAll("form")) {
    const select = form.elements.model, kind = select.dataset.kind;
    for (const m of MODELS) {
      if (kind === "any" || (kind === "superres") === m.superres) select.add(new Option(m.name, m.name));
    }
    select.addEventListener("change", () => fillClasses(form));
    fillClasses(form);
    if (!select.options.length) {
      select.add(new Option("no such model served", ""));
      for (const button of form.querySelectorAll("button")) button.disabled = true;
    }
  }
  setDrawingSize();
}

for (const button of document.querySelectorAll(".tab")) {
  button.addEventListener("click", () => {
    for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b === button);
    for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === `tab-${button.dataset.tab}`);
  });
}
for (const button of document.querySelectorAll(".stop")) {
  button.addEventListener("click", () => running[button.dataset.for] && running[button.dataset.for].abort());
}

loadModels().catch((error) => showError(`cannot list the models: ${error.message}`));
