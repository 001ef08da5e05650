// The blip3o web page: plain JavaScript over the server's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
let modelId = null;
let history = [];       // the chat so far, as OpenAI messages
let attachment = null;  // a data: URL waiting to be sent with the next question
let sources = [];       // the images the next edit starts from: {name, url, file} (file only for an upload)

// POSTs `body`, an object as JSON or a FormData as a multipart form; a failure throws the server's message.
async function api(path, body) {
  const request = body instanceof FormData
    ? {method: "POST", body}  // the browser writes the multipart Content-Type with its boundary
    : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, request);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function status(id, text, isError = false) {
  $(id).textContent = text;
  $(id).className = isError ? "error" : "muted";
}

async function loadModel() {
  try {
    const models = await (await fetch("/v1/models")).json();
    modelId = models.data[0].id;
    $("model").textContent = `model: ${modelId}`;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// n, seed and size as the fields with these ids hold them; seed and size are left out when empty.
function imageOptions(countId, seedId, sizeId) {
  const options = {n: Number($(countId).value) || 1};
  if ($(seedId).value !== "") options.seed = Number($(seedId).value);
  if ($(sizeId).value.trim() !== "") options.size = $(sizeId).value.trim();  // "WxH", width x height
  return options;
}

// One image of an answer, with an Edit button that makes it the image the Edit panel starts from.
function tile(b64, alt, className) {
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${b64}`;
  img.alt = alt;
  img.className = className;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "edit-this";
  button.textContent = "Edit";
  button.title = "edit this image";
  button.addEventListener("click", () => pick(img));
  const figure = document.createElement("figure");
  figure.append(img, button);
  return figure;
}

// Asks `path` for images and shows them in `panel`'s images, timed in its status line; `body` may be a promise.
async function requestImages(panel, path, body, alt) {
  const {button, statusId, images, className, busy} = panel;
  $(button).disabled = true;
  status(statusId, busy);
  const started = performance.now();
  try {
    const result = await (await api(path, await body)).json();
    $(images).replaceChildren(...result.data.map((item, i) => tile(item.b64_json, `${alt} (${i + 1})`, className)));
    status(statusId, `${result.data.length} image(s) in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  } catch (e) {
    status(statusId, e.message, true);
  } finally {
    $(button).disabled = false;
  }
}

const GENERATE = {button: "generate", statusId: "generate-status", images: "images", className: "generated",
                  busy: "generating…"};
const EDIT = {button: "edit", statusId: "edit-status", images: "edits", className: "edited", busy: "editing…"};

async function generate(event) {
  event.preventDefault();
  const body = {prompt: $("prompt").value, response_format: "b64_json", ...imageOptions("num-images", "seed", "size")};
  await requestImages(GENERATE, "/v1/images/generations", body, body.prompt);
}

// The images to edit become `chosen`, shown above the instruction.
function setSources(chosen) {
  for (const source of sources) if (source.file) URL.revokeObjectURL(source.url);
  sources = chosen;
  const shown = chosen.map((source) => {
    const img = document.createElement("img");
    img.src = source.url;
    img.alt = source.name;
    img.title = source.name;
    return img;
  });
  $("edit-sources").replaceChildren(...shown);
  $("edit-hint").hidden = shown.length > 0;
}

function upload() {
  const files = [...$("edit-file").files];
  setSources(files.map((file) => ({name: file.name, url: URL.createObjectURL(file), file})));
}

// An image on the page (generated or edited) becomes the one to edit.
function pick(img) {
  $("edit-file").value = "";
  setSources([{name: `${img.className}.png`, url: img.src, file: null}]);
  $("instruction").focus();
}

// The edit's multipart form: the sources as files `image` (several as `image[]`, the names OpenAI's own client
// sends) and the instruction as `prompt`, with the panel's options.
async function editForm(options) {
  const form = new FormData();
  const field = sources.length > 1 ? "image[]" : "image";
  for (const source of sources) {
    const file = source.file || await (await fetch(source.url)).blob();  // a data: URL read back as bytes
    form.append(field, file, source.name);
  }
  for (const [name, value] of Object.entries(options)) form.append(name, String(value));
  return form;
}

async function edit(event) {
  event.preventDefault();
  if (!sources.length) {
    status("edit-status", "choose an image to edit: upload one, or press Edit under an image on this page", true);
    return;
  }
  const options = {prompt: $("instruction").value, response_format: "b64_json",
                   ...imageOptions("edit-num-images", "edit-seed", "edit-size")};
  if (modelId) options.model = modelId;
  await requestImages(EDIT, "/v1/images/edits", editForm(options), options.prompt);
}

function bubble(role, text, imageUrl) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "attached image";
    div.append(img);
  }
  const span = document.createElement("span");
  span.textContent = text;
  div.append(span);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return span;
}

function attach() {
  const file = $("image-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    attachment = reader.result;
    $("attachment").src = attachment;
    $("attachment").hidden = false;
  };
  reader.readAsDataURL(file);
}

// The piece of the reply one server-sent event carries ("" for none); an error event throws the server's message.
function eventText(data) {
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(chunk.error.message || "the server failed while answering");
  const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
  if (!delta) throw new Error("the server sent an event this page does not understand");
  return delta.content || "";
}

// Reads a server-sent-events body, calling onDelta with each piece of the reply.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) throw new Error("the connection closed before the reply was complete");
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const text = eventText(data);
      if (text) onDelta(text);
    }
  }
}

async function send(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  const content = attachment
    ? [{type: "image_url", image_url: {url: attachment}}, {type: "text", text: question}]
    : question;
  history.push({role: "user", content});
  const asked = bubble("user", question, attachment).parentElement;
  const sent = attachment;
  attachment = null;
  $("attachment").hidden = true;
  $("image-file").value = "";
  $("question").value = "";
  $("send").disabled = true;
  status("chat-status", "thinking…");
  const answer = bubble("assistant", "");
  try {
    const response = await api("/v1/chat/completions", {model: modelId, messages: history, stream: true});
    await readStream(response, (piece) => { answer.textContent += piece; });
    history.push({role: "assistant", content: answer.textContent});
    if (!answer.textContent) answer.textContent = "(an empty reply)";
    answer.parentElement.classList.add("done");
    status("chat-status", "");
  } catch (e) {
    // the question was not answered: it leaves the conversation, its bubble says so, and it can be sent again
    history.pop();
    answer.parentElement.remove();
    asked.classList.add("failed");
    asked.title = `not answered: ${e.message}`;
    $("question").value = question;
    if (sent) {
      attachment = sent;
      $("attachment").src = sent;
      $("attachment").hidden = false;
    }
    status("chat-status", e.message, true);
  } finally {
    $("send").disabled = false;
  }
}

function reset() {
  history = [];
  $("messages").replaceChildren();
  status("chat-status", "");
}

$("generate-form").addEventListener("submit", generate);
$("edit-form").addEventListener("submit", edit);
$("edit-file").addEventListener("change", upload);
$("chat-form").addEventListener("submit", send);
$("image-file").addEventListener("change", attach);
$("reset").addEventListener("click", reset);
loadModel();
