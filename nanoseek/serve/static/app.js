// nanoseek chat page: plain JavaScript, no framework, no build step, no network but this server.
//
// Talks to the server's OpenAI-compatible API:
//   GET  /v1/models            -> the model id to put in requests (falls back to /health's "model")
//   POST /v1/chat/completions  -> {stream: true, thinking: bool, temperature, max_tokens, messages}
//        answered with server-sent events: `data: {chunk}` lines whose choices[0].delta carries
//        `content` / `reasoning_content`, then `data: [DONE]`; an error inside the stream is
//        `data: {"error": {...}}`.
// Stop aborts the fetch (AbortController); the server cancels the request when the client goes.
// Model output is always inserted as text (textContent), never as HTML.
"use strict";

(function () {
  const STORE_KEY = "nanoseek.chat.settings";

  const el = {
    model: document.getElementById("model"),
    thinking: document.getElementById("thinking"),
    newChat: document.getElementById("new-chat"),
    apiKey: document.getElementById("api-key"),
    temperature: document.getElementById("temperature"),
    maxTokens: document.getElementById("max-tokens"),
    messages: document.getElementById("messages"),
    error: document.getElementById("error"),
    form: document.getElementById("composer"),
    input: document.getElementById("input"),
    send: document.getElementById("send"),
    stop: document.getElementById("stop"),
  };

  const history = []; // the conversation sent with each request: {role, content}
  let controller = null; // AbortController of the request in flight, if any
  let modelName = null;

  // ---- settings (localStorage) ------------------------------------------------------------

  function loadSettings() {
    let s = {};
    try {
      s = JSON.parse(localStorage.getItem(STORE_KEY) || "{}") || {};
    } catch (e) {
      s = {};
    }
    if (typeof s.apiKey === "string") el.apiKey.value = s.apiKey;
    if (typeof s.temperature === "number") el.temperature.value = String(s.temperature);
    if (typeof s.maxTokens === "number") el.maxTokens.value = String(s.maxTokens);
    el.thinking.checked = s.thinking === true;
  }

  function saveSettings() {
    const s = {
      apiKey: el.apiKey.value,
      temperature: Number(el.temperature.value),
      maxTokens: Number(el.maxTokens.value),
      thinking: el.thinking.checked,
    };
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(s));
    } catch (e) {
      // storage may be disabled (private mode): settings then last for this page only
    }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = el.apiKey.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // ---- errors -----------------------------------------------------------------------------

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  // A readable message for a failed HTTP response (the server's errors are OpenAI's JSON shape).
  async function responseError(resp) {
    let message = "HTTP " + resp.status;
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) message += ": " + body.error.message;
    } catch (e) {
      // not JSON: keep the status alone
    }
    if (resp.status === 401) message += " (set the API key under Settings)";
    return message;
  }

  // ---- the model name ---------------------------------------------------------------------

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (resp.ok) {
        const body = await resp.json();
        if (body.data && body.data.length) modelName = body.data[0].id;
      } else if (resp.status === 401) {
        // the server wants a key: say so where the model's name goes; sending will say it too
        modelName = null;
        el.model.textContent = "(API key needed: see Settings)";
        return;
      } else {
        showError("Could not list the models: " + (await responseError(resp)));
      }
    } catch (e) {
      showError("Could not reach the server: " + e.message);
    }
    el.model.textContent = modelName || "(unknown model)";
  }

  // ---- rendering --------------------------------------------------------------------------

  // Split text on ``` fences into text and code segments; an unclosed fence (still streaming)
  // is code up to the end. The word right after the opening fence is the language.
  function segments(text) {
    const out = [];
    const parts = text.split("```");
    for (let i = 0; i < parts.length; i++) {
      let part = parts[i];
      if (i % 2 === 0) {
        if (i > 0 && part.startsWith("\n")) part = part.slice(1);
        if (part) out.push({ code: false, text: part });
        continue;
      }
      let lang = "";
      const nl = part.indexOf("\n");
      const first = nl >= 0 ? part.slice(0, nl) : part;
      if (/^[\w+#.-]*$/.test(first.trim()) && (nl >= 0 || i === parts.length - 1)) {
        lang = first.trim();
        part = nl >= 0 ? part.slice(nl + 1) : "";
      }
      if (part.endsWith("\n")) part = part.slice(0, -1);
      out.push({ code: true, lang: lang, text: part });
    }
    return out;
  }

  function renderInto(container, text) {
    const nodes = [];
    for (const seg of segments(text)) {
      if (seg.code) {
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        if (seg.lang) {
          code.className = "language-" + seg.lang.replace(/[^\w-]/g, "");
          pre.dataset.lang = seg.lang;
        }
        code.textContent = seg.text;
        pre.appendChild(code);
        nodes.push(pre);
      } else {
        const div = document.createElement("div");
        div.className = "text";
        div.textContent = seg.text;
        nodes.push(div);
      }
    }
    container.replaceChildren(...nodes);
  }

  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function scrollDown() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function addUserMessage(text) {
    const div = document.createElement("div");
    div.className = "msg user";
    const body = document.createElement("div");
    body.className = "content";
    renderInto(body, text);
    div.appendChild(body);
    el.messages.appendChild(div);
    scrollDown();
    return div;
  }

  // The assistant's bubble: a collapsible reasoning part (thinking mode) and the answer.
  function addAssistantMessage(thinking) {
    const div = document.createElement("div");
    div.className = "msg assistant streaming";
    let reasoning = null;
    let reasoningText = null;
    let summary = null;
    if (thinking) {
      reasoning = document.createElement("details");
      reasoning.className = "reasoning";
      summary = document.createElement("summary");
      summary.textContent = "Thinking…";
      reasoningText = document.createElement("div");
      reasoningText.className = "reasoning-content";
      reasoning.append(summary, reasoningText);
      div.appendChild(reasoning);
    }
    const content = document.createElement("div");
    content.className = "content";
    div.appendChild(content);
    const note = document.createElement("div");
    note.className = "note";
    div.appendChild(note);
    el.messages.appendChild(div);
    scrollDown();
    return {
      update(text, thought) {
        const follow = nearBottom();
        if (reasoningText && reasoningText.textContent !== thought) reasoningText.textContent = thought;
        renderInto(content, text);
        if (follow) scrollDown();
      },
      remove() {
        div.remove();
      },
      finish(noteText) {
        div.classList.remove("streaming");
        if (summary) summary.textContent = reasoningText.textContent ? "Reasoning" : "Reasoning (empty)";
        if (noteText) note.textContent = noteText;
      },
    };
  }

  function setBusy(busy) {
    document.body.dataset.state = busy ? "streaming" : "idle";
    el.send.disabled = busy;
    el.stop.disabled = !busy;
  }

  // ---- the request ------------------------------------------------------------------------

  function requestBody() {
    const temperature = Number(el.temperature.value);
    const maxTokens = Number(el.maxTokens.value);
    if (!(temperature >= 0 && temperature <= 2)) throw new Error("Temperature must be between 0 and 2.");
    if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) throw new Error("Max tokens must be a whole number >= 1.");
    return {
      model: modelName || "nanoseek",
      messages: history.slice(),
      stream: true,
      temperature: temperature,
      max_tokens: maxTokens,
      thinking: el.thinking.checked,
    };
  }

  // Read the SSE body, calling onChunk(obj) for each JSON event; returns true when [DONE] came.
  async function readEvents(resp, onChunk) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return true;
        onChunk(JSON.parse(data));
      }
    }
  }

  async function send(text) {
    clearError();
    let body;
    history.push({ role: "user", content: text });
    try {
      body = requestBody();
    } catch (e) {
      history.pop();
      showError(e.message);
      return;
    }
    const userDiv = addUserMessage(text);
    el.input.value = "";
    const view = addAssistantMessage(body.thinking);
    let content = "";
    let reasoning = "";
    let finishReason = null;
    let answered = false; // the server accepted the request (HTTP 200)
    let note = "";
    controller = new AbortController();
    setBusy(true);
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await responseError(resp));
      answered = true;
      const done = await readEvents(resp, (chunk) => {
        if (chunk.error) throw new Error("Server error: " + (chunk.error.message || "unknown error"));
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        const delta = choice.delta || {};
        if (delta.reasoning_content) reasoning += delta.reasoning_content;
        if (delta.content) content += delta.content;
        if (choice.finish_reason) finishReason = choice.finish_reason;
        view.update(content, reasoning);
      });
      if (!done) throw new Error("The stream ended before the answer was complete.");
      if (finishReason === "length") note = "stopped at the max tokens limit";
    } catch (e) {
      if (e.name === "AbortError") {
        note = "stopped";
      } else {
        note = "error";
        const msg = e instanceof TypeError ? "Could not reach the server: " + e.message : e.message;
        showError(msg);
      }
    } finally {
      controller.abort(); // hang up whatever is left of the stream (a no-op once it has ended)
      controller = null;
      view.update(content, reasoning);
      view.finish(note);
      if (answered) {
        // stopped or failed mid-stream: what arrived stays in the conversation
        history.push({ role: "assistant", content: content });
      } else {
        // never answered (wrong key, bad settings, server down): take the turn back, with its
        // text in the input box to resend; the error says why
        history.pop();
        view.remove();
        userDiv.remove();
        if (!el.input.value) el.input.value = text;
      }
      setBusy(false);
      el.input.focus();
    }
  }

  function stop() {
    if (controller) controller.abort();
  }

  // ---- wiring -----------------------------------------------------------------------------

  el.form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = el.input.value;
    if (controller || !text.trim()) return;
    send(text);
  });
  el.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      el.form.requestSubmit();
    } else if (ev.key === "Escape") {
      stop();
    }
  });
  el.stop.addEventListener("click", stop);
  el.newChat.addEventListener("click", () => {
    stop();
    history.length = 0;
    el.messages.replaceChildren();
    clearError();
    el.input.focus();
  });
  for (const input of [el.temperature, el.maxTokens, el.thinking]) input.addEventListener("change", saveSettings);
  el.apiKey.addEventListener("change", () => {
    saveSettings();
    clearError();
    loadModel();
  });

  loadSettings();
  setBusy(false);
  loadModel();
  el.input.focus();
})();
