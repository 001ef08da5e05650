// The blip3o web page: plain JavaScript over the server's OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
let modelId = null;
let history = [];       // the chat so far, as OpenAI messages
let attachment = null;  // a data: URL waiting to be sent with the next question

async function api(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  });
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

async function generate(event) {
  event.preventDefault();
  const body = {prompt: $("prompt").value, n: Number($("num-images").value) || 1, response_format: "b64_json"};
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("size").value.trim() !== "") body.size = $("size").value.trim();  // "WxH", width x height
  $("generate").disabled = true;
  status("generate-status", "generating…");
  const started = performance.now();
  try {
    const result = await (await api("/v1/images/generations", body)).json();
    $("images").replaceChildren(...result.data.map((item, i) => {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${item.b64_json}`;
      img.alt = `${body.prompt} (${i + 1})`;
      img.className = "generated";
      return img;
    }));
    status("generate-status", `${result.data.length} image(s) in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  } catch (e) {
    status("generate-status", e.message, true);
  } finally {
    $("generate").disabled = false;
  }
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
$("chat-form").addEventListener("submit", send);
$("image-file").addEventListener("change", attach);
$("reset").addEventListener("click", reset);
loadModel();
