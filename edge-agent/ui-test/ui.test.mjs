// Drives the edge agent's UI in headless Chromium: type an intent, submit, wait for Succeeded, check the
// result text, save a screenshot. Usage: EDGE_URL=http://127.0.0.1:PORT SCREENSHOT=path node ui.test.mjs
import { chromium } from "playwright-core";

const url = process.env.EDGE_URL;
const screenshot = process.env.SCREENSHOT || "edge-ui.png";
const prompt = process.env.PROMPT || "hello from headless chromium";
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
// "succeeded" (default): the gateway is up and the task must finish. "offline": the gateway is down and
// the page must say the intent is saved and waiting. "device": a private intent must finish on the
// device's local model and be shown as run there.
const expect = process.env.EXPECT || "succeeded";
const privacy = expect === "device" ? "private" : "public";
if (!url) {
  console.error("EDGE_URL is required");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
let failed = false;
const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
try {
  // Any request leaving the agent's origin would mean the UI is not self-contained.
  const foreign = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(url)) foreign.push(r.url());
  });
  await page.goto(url + "/");
  await page.fill("#intent-type", "summarize");
  await page.fill("#prompt", prompt);
  await page.selectOption("#privacy", privacy);
  await page.click("#submit");
  await page.waitForFunction(
    () => document.querySelector("#form-message")?.textContent.startsWith("Saved on this device"),
    null,
    { timeout: 10_000 },
  );
  // The newest task is first in the list.
  const task = page.locator("#tasks li.task").first();
  if (expect === "offline") {
    await task.locator(".phase", { hasText: "Pending upload (waiting: offline)" }).waitFor({ timeout: 30_000 });
    await page.locator("#link", { hasText: "offline" }).waitFor({ timeout: 10_000 });
    console.log("UI OK: offline, waiting to upload");
  } else if (expect === "device") {
    await task.locator(".phase", { hasText: "Succeeded" }).waitFor({ timeout: 60_000 });
    const where = await task.locator(".where").textContent();
    if (where !== "on this device") throw new Error(`shown as run on ${JSON.stringify(where)}`);
    // The local model's random weights write nonsense, but they write something.
    const result = await task.locator(".result").textContent();
    if (!result) throw new Error("no result from the local model");
    console.log("UI OK: ran on this device, result =", JSON.stringify(result));
  } else {
    await task.locator(".phase", { hasText: "Succeeded" }).waitFor({ timeout: 30_000 });
    const where = await task.locator(".where").textContent();
    if (where !== "cloud") throw new Error(`shown as run on ${JSON.stringify(where)}`);
    const result = await task.locator(".result").textContent();
    if (!result || !result.includes(prompt)) {
      throw new Error(`result ${JSON.stringify(result)} does not mention the prompt`);
    }
    const link = await page.textContent("#link");
    if (!link.includes("online")) throw new Error(`link indicator says ${JSON.stringify(link)}`);
    console.log("UI OK: result =", JSON.stringify(result));
  }
  if (foreign.length) throw new Error("requests left the agent's origin: " + foreign.join(", "));
} catch (e) {
  failed = true;
  console.error("UI test failed:", e.message);
} finally {
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log("screenshot:", screenshot);
  await browser.close();
}
process.exit(failed ? 1 : 0);
