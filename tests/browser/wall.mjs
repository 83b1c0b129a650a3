// The wall board in headless Chromium, many screens at once, driven by
// tests/it/wall.rs, which owns nats-server and nudge:
//
//   NUDGE_URL=http://127.0.0.1:PORT/ NUDGE_TOKEN=... BOARD=sales MEMBER=Ben
//   SCORES='[150, 151]' PAGES=15 node wall.mjs
//
// Protocol on stdout, one line each:
//   READY                 all PAGES pages show the ranking and are live; the
//                         test then publishes the sale that gives MEMBER the
//                         first of SCORES
//   SHOWN [t1, ...]       each page's time (ms since the epoch) when it drew
//                         that score
//   FLASHED               the changed row flashes on every page (a running
//                         animation, class `flash`); then `RESTART`: the
//                         test restarts nudge and publishes the next sale
//   RECONNECTED [t1, ...] every page is live again and drew the second score
// Anything else goes to stderr; on failure a screenshot is saved and the exit
// code is 1.

import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const url = need("NUDGE_URL");
const token = need("NUDGE_TOKEN");
const board = need("BOARD");
const member = need("MEMBER");
const [first, second] = JSON.parse(need("SCORES"));
const pages = Number(need("PAGES"));
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT = Number(process.env.NUDGE_WAIT_MS || 30000);

function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (this script is run by tests/it/wall.rs)`);
  return v;
}
const log = (...a) => console.error("[wall.mjs]", ...a);
const fail = (msg) => { throw new Error(msg); };

// When the page drew `score` for the member (its own record of changes).
function drawnAt(page, score) {
  return page.waitForFunction(([m, s]) => (window.boardChanges || []).find((c) => c.member === m && c.score === s)?.at,
    [member, score], { timeout: WAIT, polling: 20 }).then((h) => h.jsonValue());
}

let browser;
const open = [];
const pageErrors = [];
try {
  browser = await chromium.launch({ executablePath, headless: true });
  for (let i = 0; i < pages; i++) {
    // A context each, like the wall's separate screens: a browser keeps at
    // most six HTTP/1.1 connections per host, and each page's live feed
    // holds one for good.
    const context = await browser.newContext({ viewport: { width: 1280, height: 720 } });
    // The token the wall keeps in the browser, as a person enters it once.
    await context.addInitScript((t) => localStorage.setItem("nudge-token", t), token);
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT);
    page.on("pageerror", (e) => pageErrors.push(`page ${i}: ${e}`));
    open.push(page);
  }
  await Promise.all(open.map((p) => p.goto(`${url}boards/${board}`)));
  await Promise.all(open.map(async (p) => {
    await p.locator('#live-state[data-state="open"]').waitFor();
    await p.locator(`#ranking li[data-member="${member}"]`).waitFor();
  }));
  // The team tabs are there, and the row is big enough to read across a room.
  const tabs = await open[0].locator("#tabs a").count();
  if (tabs < 2) fail(`expected team tabs, found ${tabs}`);
  const size = await open[0].locator("#ranking li .name").first().evaluate((el) => parseFloat(getComputedStyle(el).fontSize));
  if (size < 28) fail(`names are ${size}px high at 1280 px: too small for a wall`);
  console.log("READY");

  const shown = await Promise.all(open.map((p) => drawnAt(p, first)));
  console.log(`SHOWN ${JSON.stringify(shown)}`);
  // When the feed brought each page the sale (its day score, which here
  // is the member's whole score): the rest of SHOWN is the page's reload.
  const fed = await Promise.all(open.map((p) => p.evaluate((m) => (window.boardFeed || []).find((c) => c.member === m)?.at ?? null, member)));
  console.log(`FED ${JSON.stringify(fed)}`);
  // The page drew the sale ranked by itself from the rows it had; the answer
  // it reloaded next must rank the same.
  for (const [i, p] of open.entries()) {
    const h = await p.waitForFunction(() => window.boardRankedThere && [window.boardRankedHere, window.boardRankedThere], null, { timeout: WAIT, polling: 50 });
    const line = (es) => JSON.stringify(es.map((e) => [e.rank, e.member, e.label, e.group, e.score]));
    const [here, there] = (await h.jsonValue()).map(line);
    if (here !== there) fail(`page ${i} ranked ${here}, nudge ${there}`);
  }

  // The changed row flashed on every page: each page notes whether the row
  // it drew had the flash animation; on the first page it is still on.
  for (const [i, p] of open.entries()) {
    const flashed = await p.evaluate(([m, s]) => window.boardChanges.find((c) => c.member === m && c.score === s)?.flash, [member, first]);
    if (flashed !== true) fail(`page ${i}: the changed row did not flash`);
  }
  const on = await open[0].locator(`#ranking li[data-member="${member}"]`).evaluate((li) => li.classList.contains("flash"));
  if (!on) fail("the changed row on the first page has no flash");
  const rowScore = await open[0].locator(`#ranking li[data-member="${member}"]`).getAttribute("data-score");
  if (Number(rowScore) !== first) fail(`the row shows ${rowScore}, expected ${first}`);
  console.log("FLASHED");
  console.log("RESTART");

  // nudge goes away and comes back: every page must notice and reconnect.
  await Promise.all(open.map((p) => p.locator('#live-state:not([data-state="open"])').waitFor()));
  log("all pages saw nudge go");
  const again = await Promise.all(open.map((p) => drawnAt(p, second)));
  await Promise.all(open.map((p) => p.locator('#live-state[data-state="open"]').waitFor()));
  if (pageErrors.length) fail(`errors in the pages: ${pageErrors.join("; ")}`);
  console.log(`RECONNECTED ${JSON.stringify(again)}`);
  await browser.close();
} catch (e) {
  log("FAILED:", e && e.stack ? e.stack : e);
  if (pageErrors.length) log("errors in the pages:", pageErrors.join("; "));
  if (open[0]) {
    try {
      const shot = join(mkdtempSync(join(tmpdir(), "nudge-wall-")), "wall.png");
      await open[0].screenshot({ path: shot });
      log("screenshot:", shot);
    } catch (_) { /* the failure above is what matters */ }
  }
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}
