// The approver console: lists what waits for a decision and approves or denies it through the
// gateway's /v1 API, with the approver's bearer token. The token lives in this closure only.
"use strict";

(function () {
  let token = "";

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function say(text, kind) {
    const m = $("message");
    m.textContent = text;
    m.className = "message" + (kind ? " " + kind : "");
  }

  // One API call; resolves to the parsed body, or throws an Error whose message is the gateway's.
  async function api(method, path, body) {
    const init = { method, headers: { authorization: "Bearer " + token }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      throw new Error("the gateway is not responding (" + e.message + ")");
    }
    let j = null;
    try {
      j = await r.json();
    } catch (_) {
      // Not JSON: reported below with the status.
    }
    if (!r.ok) {
      const detail = j && j.error ? j.error.message + " (" + j.error.code + ")" : "HTTP " + r.status;
      const err = new Error(detail);
      err.status = r.status;
      throw err;
    }
    return j;
  }

  function describeCall(p) {
    if (p.step === undefined || p.step === null) return "the whole task (its intent rule asks for approval)";
    return "step " + p.step + ": " + p.server + "/" + p.tool;
  }

  function render(list) {
    const ul = $("approvals");
    ul.replaceChildren();
    $("empty").hidden = list.length !== 0;
    for (const p of list) {
      const li = el("li", "approval");
      li.dataset.taskId = p.taskId;
      const head = el("div", "head");
      head.append(el("span", "intent", p.intentType), el("span", "task-id", p.taskId));
      li.append(head);
      li.append(el("p", "meta", "device " + p.deviceId + " · user " + p.userId +
        (p.waitingSince ? " · waiting since " + new Date(p.waitingSince).toLocaleString() : "")));
      li.append(el("p", "prompt", p.prompt));
      li.append(el("p", "call", "Decide on " + describeCall(p)));
      if (p.arguments !== undefined && p.arguments !== null) {
        li.append(el("pre", "arguments", JSON.stringify(p.arguments, null, 2)));
      }
      const actions = el("div", "actions");
      const comment = el("input", "comment");
      comment.type = "text";
      comment.maxLength = 1024;
      comment.placeholder = "comment (optional)";
      comment.setAttribute("aria-label", "comment for " + p.taskId);
      const approve = el("button", "approve", "Approve");
      const deny = el("button", "deny", "Deny");
      approve.type = deny.type = "button";
      approve.addEventListener("click", () => decide(p, "approve", comment.value, [approve, deny]));
      deny.addEventListener("click", () => decide(p, "deny", comment.value, [approve, deny]));
      actions.append(comment, approve, deny);
      li.append(actions);
      ul.append(li);
    }
  }

  async function load() {
    say("Loading…");
    try {
      const j = await api("GET", "/v1/approvals");
      render(j.pending || []);
      $("refresh").disabled = false;
      $("who").textContent = "signed in";
      say(j.pending.length + " waiting for a decision", "ok");
    } catch (e) {
      $("approvals").replaceChildren();
      $("empty").hidden = true;
      $("refresh").disabled = true;
      $("who").textContent = "not signed in";
      if (e.status === 401) say("The gateway does not accept this token: " + e.message, "error");
      else if (e.status === 403) say("This token is not an approver's: " + e.message, "error");
      else say("Could not list approvals: " + e.message, "error");
    }
  }

  // Records the decision, then follows the task until the controller has acted on it.
  async function decide(p, verb, comment, buttons) {
    buttons.forEach((b) => (b.disabled = true));
    const body = {};
    if (p.step !== undefined && p.step !== null) body.step = p.step;
    if (p.argsDigest) body.argsDigest = p.argsDigest;
    if (comment) body.comment = comment;
    const what = describeCall(p);
    try {
      await api("POST", "/v1/tasks/" + encodeURIComponent(p.taskId) + "/" + verb, body);
      say((verb === "approve" ? "Approved " : "Denied ") + what + " of task " + p.taskId + "; waiting for the controller…", "ok");
    } catch (e) {
      say("Could not " + verb + " task " + p.taskId + ": " + e.message, "error");
      buttons.forEach((b) => (b.disabled = false));
      return;
    }
    const deadline = Date.now() + 30000;
    let t = null;
    while (Date.now() < deadline) {
      try {
        t = await api("GET", "/v1/tasks/" + encodeURIComponent(p.taskId));
      } catch (e) {
        say("Decision recorded, but the task cannot be read: " + e.message, "error");
        return;
      }
      if (t.phase !== "AwaitingApproval") break;
      await new Promise((r) => setTimeout(r, 300));
    }
    if (t && t.phase !== "AwaitingApproval") {
      say("Task " + p.taskId + " is now " + t.phase + (t.reason ? ": " + t.reason : ""), "ok");
    } else {
      say("Decision recorded for task " + p.taskId + "; the controller has not acted on it yet (is the approver still in the policy?)", "error");
    }
    await refreshList();
  }

  // Refreshes the list without replacing the last message.
  async function refreshList() {
    try {
      const j = await api("GET", "/v1/approvals");
      render(j.pending || []);
    } catch (e) {
      say("Could not list approvals: " + e.message, "error");
    }
  }

  $("sign-in").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    load();
  });
  $("refresh").addEventListener("click", () => load());
})();
