// The staff page end to end in headless Chromium, driven by
// tests/it/browser.rs, which owns nats-server, the SMTP sink and nudge:
//
//   NUDGE_URL=http://127.0.0.1:PORT/ NUDGE_TOKEN=... NUDGE_EXPECT='{json}' node staff.mjs
//
// NUDGE_EXPECT: {"query", "client_id", "name", "orders": {channel: {"count",
// "items", "spent"}}, "total_spent", then "task" (words of the task's title)
// and "orders_after" / "total_spent_after" (the view once the task's event
// came in)}. Amounts are compared as the page prints them ("50.00").
//
// Protocol on stdout, one line each: `READY_FOR_TASK` once the client's
// history is checked (the test then publishes the event that makes the
// task), then `DONE <task id>` once the task was marked done in the page.
// Anything else goes to stderr; on failure a screenshot is saved (its path
// is printed) and the exit code is 1.

import { chromium } from "playwright-core";
import { mkdtempSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

const url = need("NUDGE_URL");
const token = need("NUDGE_TOKEN");
const expect = JSON.parse(need("NUDGE_EXPECT"));
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
// Where the screenshots at three widths go (kept as the test's artefacts).
const shots = need("NUDGE_SCREENSHOTS");
// axe-core, injected into the page for the accessibility check.
const axeSource = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");
// One wait; the whole run is bounded by the Rust test as well.
const WAIT = Number(process.env.NUDGE_WAIT_MS || 20000);

function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (this script is run by tests/it/browser.rs)`);
  return v;
}

const log = (...a) => console.error("[staff.mjs]", ...a);
const fail = (msg) => { throw new Error(msg); };

function check(what, got, want) {
  if (got !== want) fail(`${what}: page shows ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
}

let browser, page;
const pageErrors = [];

try {
  browser = await chromium.launch({ executablePath, headless: true });
  page = await browser.newPage();
  page.setDefaultTimeout(WAIT);
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  // Expected: the live feed's first try before the token is given (401), and
  // the favicon (404).
  page.on("response", (r) => { if (r.status() >= 400) log("HTTP", r.status(), r.url()); });
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) log("console:", m.text());
  });
  let loads = 0;
  page.on("load", () => loads++);

  await page.goto(url);

  // A fresh browser has no token: the page asks for it, and the live feed is
  // refused until it is given.
  const tokenBox = page.locator("#token");
  // Searching without a token says so, and throws nothing.
  await page.locator("#q").fill("anyone");
  await page.locator("#q").press("Enter");
  await page.locator("#status", { hasText: "Enter the API token" }).waitFor();
  // A wrong token is named as such.
  await tokenBox.fill("not-the-token-at-all");
  await tokenBox.press("Enter");
  await page.locator("#q").press("Enter");
  await page.locator("#status", { hasText: "token is wrong" }).waitFor();
  await tokenBox.fill("");
  if ((await tokenBox.inputValue()) === "") {
    await tokenBox.fill(token);
    await tokenBox.press("Enter"); // "change": the page keeps it and reconnects
  }
  // Subscribed to the live feed before anything is published.
  await page.locator('#live-state[data-state="open"]').waitFor();

  // Search, then open the client.
  await page.locator("#q").fill(expect.query);
  const hit = page.locator(`#results li[data-id="${expect.client_id}"]`);
  await hit.waitFor();
  const hitText = await hit.innerText();
  if (!hitText.includes(expect.name)) fail(`search result ${JSON.stringify(hitText)} lacks ${expect.name}`);
  // By keyboard: arrow down from the search box to the result, Enter opens it.
  await page.locator("#q").focus();
  await page.keyboard.press("ArrowDown");
  const focused = await page.evaluate(() => document.activeElement?.closest("li")?.dataset.id);
  check("result focused by keyboard", focused, expect.client_id);
  await page.keyboard.press("Enter");
  await page.locator("#client h2", { hasText: expect.name }).waitFor();
  await page.locator("#events li").first().waitFor();
  for (const want of ["#locale", "#local-time", "#process-log li", "#mails li"]) {
    if (!(await page.locator(want).count())) fail(`the client view lacks ${want}`);
  }
  await checkWidths("client");

  await checkOrders(expect.orders, expect.total_spent);
  check("open tasks before", await page.locator("#tasks li[data-task-id]").count(), 0);
  log("history checked:", JSON.stringify(expect.orders), "total", expect.total_spent);
  console.log("READY_FOR_TASK");

  // The task arrives on the live feed, and the client on screen refreshes:
  // no reload.
  const liveTask = page.locator("#live li[data-kind=task]", { hasText: expect.task });
  await liveTask.waitFor();
  const taskId = await liveTask.getAttribute("data-task-id");
  if (!taskId) fail("the live task line has no task id");
  const openTask = page.locator(`#tasks li[data-task-id="${taskId}"]`);
  await openTask.waitFor();
  const openText = await openTask.innerText();
  if (!openText.includes(expect.task)) fail(`open task ${JSON.stringify(openText)} lacks ${expect.task}`);
  await waitOrders(expect.orders_after, expect.total_spent_after);
  check("page loads (a reload would add one)", loads, 1);
  log("task", taskId, "live and open:", JSON.stringify(openText));

  await openTask.locator("button.done").click();
  // Done: gone from the open tasks, marked done in the live feed.
  await openTask.waitFor({ state: "detached" });
  await page.locator(`#live li.done[data-task-id="${taskId}"]`).waitFor();
  check("open tasks after", await page.locator("#tasks li[data-task-id]").count(), 0);
  await page.locator("#tasks li.muted", { hasText: "none" }).waitFor();
  check("status line", await page.locator("#status").innerText(), "");

  // Reports (the token is an admin's, so a marketer's view shows): the
  // welcome rule mailed this client, so its report counts them exposed.
  const experiment = page.locator("#experiments li", { hasText: "rule welcome" });
  await experiment.waitFor();
  await page.locator("#report-rule option", { hasText: "welcome" }).first().waitFor({ state: "attached" });
  await page.locator("#report-rule").selectOption("welcome");
  await page.locator("#report-show").click();
  const mailedRow = page.locator("#report tr").filter({ has: page.locator("td", { hasText: /^mailed$/ }) });
  await mailedRow.waitFor();
  const exposed = Number(await mailedRow.locator("td").nth(1).innerText());
  if (!(exposed >= 1)) fail(`the welcome report counts ${exposed} exposed`);
  if (!(await page.locator("#report", { hasText: "goal: order_placed within 14 days" }).count())) fail("the report does not show the rule's goal");
  await checkWidths("reports");
  log("report of welcome:", exposed, "exposed");
  if (pageErrors.length) fail(`errors in the page: ${pageErrors.join("; ")}`);
  console.log(`DONE ${taskId}`);
  await browser.close();
} catch (e) {
  log("FAILED:", e && e.stack ? e.stack : e);
  if (pageErrors.length) log("errors in the page:", pageErrors.join("; "));
  if (page) {
    try {
      const dir = mkdtempSync(join(tmpdir(), "nudge-staff-"));
      const shot = join(dir, "staff.png");
      await page.screenshot({ path: shot, fullPage: true });
      log("screenshot:", shot);
    } catch (s) {
      log("no screenshot:", s.message);
    }
  }
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}

// At 360, 800 and 1280 px: nothing wider than the window, a screenshot
// kept, and no serious or critical axe-core violation.
async function checkWidths(what) {
  for (const width of [360, 800, 1280]) {
    await page.setViewportSize({ width, height: 900 });
    await page.waitForTimeout(100);
    const over = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (over > 0) fail(`at ${width} px the page is ${over} px wider than the window`);
    await page.screenshot({ path: join(shots, `staff-${width}.png`), fullPage: true });
    // Evaluated, not added as a script tag: the page's CSP refuses inline scripts it does not know.
    if ((await page.evaluate(() => typeof window.axe)) === "undefined") await page.evaluate(axeSource);
    const result = await page.evaluate(async () => await window.axe.run(document, { resultTypes: ["violations"] }));
    const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
    if (bad.length) fail(`axe at ${width} px: ${bad.map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`).join("; ")}`);
    log(`${what} at ${width} px: fits, screenshot kept, axe: ${result.violations.length} minor violation(s)`);
  }
  await page.setViewportSize({ width: 1280, height: 900 });
}

// The orders table, channel by channel, and the total spent, as shown now.
async function readOrders() {
  const rows = {};
  for (const tr of await page.locator("#orders tr[data-channel]").all()) {
    const cell = async (c) => (await tr.locator(`td.${c}`).innerText()).trim();
    rows[await tr.getAttribute("data-channel")] = {
      count: Number(await cell("count")),
      items: Number(await cell("items")),
      spent: await cell("spent"),
    };
  }
  return { rows, total: (await page.locator("#total-spent").innerText()).trim() };
}

async function checkOrders(want, total) {
  const got = await readOrders();
  const canon = (rows) => JSON.stringify(Object.keys(rows).sort().map((ch) =>
    [ch, { count: rows[ch].count, items: rows[ch].items, spent: rows[ch].spent }]));
  if (canon(got.rows) !== canon(want)) fail(`orders per channel: page shows ${canon(got.rows)}, expected ${canon(want)}`);
  check("total spent", got.total, total);
}

// The view refreshes by itself when the client's events come in: waits for
// the expected table (a render that may still be on its way), then checks it.
async function waitOrders(want, total) {
  try {
    await page.waitForFunction((t) => document.querySelector("#total-spent")?.textContent.trim() === t, total, { timeout: WAIT });
  } catch {
    // Report what is shown instead of a bare timeout.
  }
  await checkOrders(want, total);
}
