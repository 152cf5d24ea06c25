// Drives the gateway's approver console in headless Chromium against a real runtime: a wrong token
// is refused with a clear message; the right one lists the pending approvals; Approve moves the
// task-level one on; Deny (with a comment) denies the step-level one, and the page names the step.
// Usage: GATEWAY_URL=… TOKEN=… TASK_LEVEL=<task id> STEP_LEVEL=<task id> SCREENSHOT=… node approvals.test.mjs
import { chromium } from "playwright-core";

const url = process.env.GATEWAY_URL;
const token = process.env.TOKEN;
const taskLevel = process.env.TASK_LEVEL;
const stepLevel = process.env.STEP_LEVEL;
const screenshot = process.env.SCREENSHOT || "approvals.png";
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!url || !token || !taskLevel || !stepLevel) {
  console.error("GATEWAY_URL, TOKEN, TASK_LEVEL and STEP_LEVEL are required");
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

  // The approver's token: both waiting tasks, the step-level one with its call and arguments.
  await page.fill("#token", token);
  await page.click("#load");
  const a = page.locator(`li.approval[data-task-id="${taskLevel}"]`);
  const b = page.locator(`li.approval[data-task-id="${stepLevel}"]`);
  await a.waitFor({ timeout: 30_000 });
  await b.waitFor({ timeout: 30_000 });
  const call = await b.locator(".call").textContent();
  if (!call.includes("step 3: files/delete")) throw new Error(`step-level call shows ${JSON.stringify(call)}`);
  const args = await b.locator(".arguments").textContent();
  if (!args.includes("/tmp/old-report")) throw new Error(`arguments show ${JSON.stringify(args)}`);
  const whole = await a.locator(".call").textContent();
  if (!whole.includes("the whole task")) throw new Error(`task-level call shows ${JSON.stringify(whole)}`);

  // Approve the task-level one: the controller moves it on and the page says so.
  await a.locator("button.approve").click();
  await waitMessage(
    (id) => {
      const t = document.querySelector("#message")?.textContent || "";
      return t.startsWith(`Task ${id} is now`) && !t.includes("AwaitingApproval");
    },
    "approve",
    taskLevel,
  );
  console.log("approved:", JSON.stringify(await message()));
  await a.waitFor({ state: "detached", timeout: 10_000 });

  // Deny the step-level one with a comment: denied, and the step is named.
  await b.locator("input.comment").fill("not that file");
  await b.locator("button.deny").click();
  await waitMessage(
    () => (document.querySelector("#message")?.textContent || "").includes("is now Denied"),
    "deny",
  );
  const denied = await message();
  if (!denied.includes("at step 3 (files/delete)")) throw new Error(`denial says ${JSON.stringify(denied)}`);
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
