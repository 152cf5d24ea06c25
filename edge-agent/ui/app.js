// The edge agent's local UI. Talks only to the agent on this device (same origin); every value from the
// API is inserted as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let online = null;

// What the person sees for each stored state / gateway phase.
function label(task) {
  switch (task.state) {
    case "pending":
      return online === false ? "Pending upload (waiting: offline)" : "Pending upload";
    case "held":
      return "Kept on this device";
    case "local":
      return "Queued on this device";
    case "rejected":
      return "Rejected";
    default:
      return task.phase === "Pending" ? "Submitted" : (task.phase || "Submitted");
  }
}

function cssClass(task) {
  if (task.state === "pending" || task.state === "local") return "pending";
  if (task.state === "rejected" || task.phase === "Failed" || task.phase === "Denied") return "failed";
  if (task.phase === "Succeeded") return "succeeded";
  return "active";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function renderTasks(tasks) {
  const list = $("tasks");
  const items = tasks.map((t) => {
    const li = el("li", "task " + cssClass(t));
    li.dataset.taskId = t.taskId;
    const head = el("div", "head");
    // Where it runs: "on this device" (the local model; never sent) or "cloud" (the gateway).
    const where = el("span", "where " + t.runsOn, t.runsOn === "device" ? "on this device" : "cloud");
    where.dataset.runsOn = t.runsOn;
    head.append(el("span", "type", t.intentType), where, el("span", "phase", label(t)));
    li.append(head, el("div", "prompt", t.prompt));
    if (t.result) li.append(el("div", "result", t.result));
    if (t.reason) li.append(el("div", "meta reason", t.reason));
    if ((t.state === "pending" || t.state === "local") && t.lastError) li.append(el("div", "meta", "last attempt: " + t.lastError));
    li.append(el("div", "meta", "#" + t.seq + " · " + t.taskId + " · " + t.privacy));
    return li;
  });
  list.replaceChildren(...items);
}

function renderState(s) {
  online = s.link.online;
  const link = $("link");
  if (s.link.online === true) {
    link.className = "link online";
    link.textContent = "online";
  } else if (s.link.online === false) {
    link.className = "link offline";
    link.textContent = "offline: waiting to upload" + (s.link.nextRetryAt ? " (next try " + new Date(s.link.nextRetryAt).toLocaleTimeString() + ")" : "");
    link.title = s.link.lastError || "";
  } else {
    link.className = "link unknown";
    link.textContent = "not connected yet";
  }
  const c = s.counts;
  $("counts").textContent = "(" + c.pending + " waiting to upload, " + c.sent + " running, " + c.local + " queued on this device, " + c.done + " done)";
  $("device").textContent = "device " + s.deviceId + " · key " + s.keyId;
}

async function refresh() {
  try {
    const [state, tasks] = await Promise.all([
      fetch("/api/state").then((r) => r.json()),
      fetch("/api/intents?limit=50").then((r) => r.json()),
    ]);
    renderState(state);
    renderTasks(tasks);
  } catch (e) {
    $("link").className = "link offline";
    $("link").textContent = "agent not responding";
  }
}

$("intent-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const msg = $("form-message");
  msg.className = "message";
  msg.textContent = "Saving…";
  const body = {
    type: $("intent-type").value.trim(),
    prompt: $("prompt").value,
    privacyLevel: $("privacy").value,
  };
  try {
    const r = await fetch("/api/intents", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const j = await r.json().catch(() => ({}));
    if (r.ok) {
      msg.textContent = "Saved on this device (#" + j.seq + ")" +
        (j.runsOn === "device" ? "; it runs here on the local model and is never sent."
          : online === true ? "; sending to the gateway." : "; it will upload when online.");
      $("prompt").value = "";
    } else {
      msg.className = "message error";
      msg.textContent = (j.error && j.error.message) || ("error " + r.status);
    }
  } catch (e) {
    msg.className = "message error";
    msg.textContent = "The agent is not responding: " + e;
  }
  refresh();
});

refresh();
setInterval(refresh, 1000);
