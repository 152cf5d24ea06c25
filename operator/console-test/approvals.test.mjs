// Drives the gateway's approver console in headless Chromium against a real runtime: a wrong token
// is refused with a clear message; the right one lists the pending approvals, the step-level ones
// with their call and arguments; Approve moves the task-level one on; Approve moves a plan parked at
// a tool step on; Deny (with a comment) denies the other plan's step, and the page names the step.
// Usage: GATEWAY_URL=… TOKEN=… TASK_LEVEL=<task id> STEP_APPROVE=<task id> STEP_DENY=<task id>
//        STEP_CALL="step N: server/tool" STEP_ARGUMENT=<text in the arguments> SCREENSHOT=…
//        node approvals.test.mjs
import { chromium } from "playwright-core";

const url = process.env.GATEWAY_URL;
const token = process.env.TOKEN;
const taskLevel = process.env.TASK_LEVEL;
const stepApprove = process.env.STEP_APPROVE;
const stepDeny = process.env.STEP_DENY;
const stepCall = process.env.STEP_CALL;
const stepArgument = process.env.STEP_ARGUMENT;
const screenshot = process.env.SCREENSHOT || "approvals.png";
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!url || !token || !taskLevel || !stepApprove || !stepDeny || !stepCall || !stepArgument) {
  console.error("GATEWAY_URL, TOKEN, TASK_LEVEL, STEP_APPROVE, STEP_DENY, STEP_CALL and STEP_ARGUMENT are required");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
let failed = false;
const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
const message = () => page.textContent("#message");
async function waitMessage(pred, what, arg = null) {
  try {
    await page.waitForFunction(pred, arg, { timeout: 30_000 });
  } catch (e) {
    throw new Error(`${what}: the page says ${JSON.stringify(await message())}`);
  }
}
try {
  // Nothing may leave the gateway's origin, and the page must run without a CSP violation.
  const foreign = [];
  const problems = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(url)) foreign.push(r.url());
  });
  page.on("console", (m) => {
    if (m.type() === "error" && !/401|403/.test(m.text())) problems.push(m.text());
  });
  page.on("pageerror", (e) => problems.push(e.message));
  const resp = await page.goto(url + "/approvals");
  const csp = resp.headers()["content-security-policy"] || "";
  if (!csp.includes("script-src 'self'") || csp.includes("unsafe-inline")) {
    throw new Error(`Content-Security-Policy is ${JSON.stringify(csp)}`);
  }

  // A wrong token: a clear refusal, nothing listed.
  await page.fill("#token", "not-the-token");
  await page.click("#load");
  await waitMessage(
    () => document.querySelector("#message")?.textContent.startsWith("The gateway does not accept this token"),
    "wrong token",
  );
  if ((await page.locator("#approvals li").count()) !== 0) throw new Error("a wrong token listed approvals");
  console.log("wrong token:", JSON.stringify(await message()));

  // The approver's token: all three waiting tasks, the step-level ones with their call and arguments.
  await page.fill("#token", token);
  await page.click("#load");
  const a = page.locator(`li.approval[data-task-id="${taskLevel}"]`);
  const steps = [stepApprove, stepDeny].map((id) => page.locator(`li.approval[data-task-id="${id}"]`));
  for (const li of [a, ...steps]) await li.waitFor({ timeout: 30_000 });
  for (const li of steps) {
    const call = await li.locator(".call").textContent();
    if (!call.includes(stepCall)) throw new Error(`step-level call shows ${JSON.stringify(call)}`);
    const args = await li.locator(".arguments").textContent();
    if (!args.includes(stepArgument)) throw new Error(`arguments show ${JSON.stringify(args)}`);
  }
  const whole = await a.locator(".call").textContent();
  if (!whole.includes("the whole task")) throw new Error(`task-level call shows ${JSON.stringify(whole)}`);

  // Approve: the controller moves the task on and the page says so.
  async function approve(li, id) {
    await li.locator("button.approve").click();
    await waitMessage(
      (id) => {
        const t = document.querySelector("#message")?.textContent || "";
        return t.startsWith(`Task ${id} is now`) && !t.includes("AwaitingApproval");
      },
      "approve",
      id,
    );
    console.log("approved:", JSON.stringify(await message()));
    await li.waitFor({ state: "detached", timeout: 10_000 });
  }
  await approve(a, taskLevel);
  await approve(steps[0], stepApprove);

  // Deny the other step with a comment: denied, and the step is named.
  await steps[1].locator("input.comment").fill("not that record");
  await steps[1].locator("button.deny").click();
  await waitMessage(
    () => (document.querySelector("#message")?.textContent || "").includes("is now Denied"),
    "deny",
  );
  const denied = await message();
  const at = stepCall.replace(/^step (\d+): (.*)$/, "at step $1 ($2)");
  if (!denied.includes(at)) throw new Error(`denial says ${JSON.stringify(denied)}, not ${JSON.stringify(at)}`);
  console.log("denied:", JSON.stringify(denied));
  await page.locator("#empty").waitFor({ state: "visible", timeout: 10_000 });

  if (foreign.length) throw new Error("requests left the gateway's origin: " + foreign.join(", "));
  if (problems.length) throw new Error("page errors: " + problems.join(" | "));
  console.log("CONSOLE OK");
} catch (e) {
  failed = true;
  console.error("console test failed:", e.message);
} finally {
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log("screenshot:", screenshot);
  await browser.close();
}
process.exit(failed ? 1 : 0);
