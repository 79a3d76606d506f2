// The seed's flows in headless Chromium, driven by role and name like a person would:
// view events, subscribe a function, see it in the subscriber list, deactivate it, unsubscribe
// with confirmation, send a test event, find a failed execution and its error, and see a new run
// appear live. Run by tests/it/dashboard.rs: node dashboard.js ADMIN_URL SCREENSHOT_DIR, with
// DATABASE_URL for the writes that make new runs.
"use strict";
const path = require("path");
const { chromium } = require("playwright-core");
const { Client } = require("pg");

const [base, shots] = process.argv.slice(2);
const TIMEOUT = 20000;

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(shots, name + ".png"), fullPage: true });
}

// The viewport only, small: the README's tour is made from these.
async function tour(page, name) {
  await page.screenshot({ path: path.join(shots, "tour-" + name + ".png") });
}

async function flash(page, text) {
  await page.getByText(text, { exact: true }).waitFor({ timeout: TIMEOUT });
}

let page;

async function main() {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });

  // View events: the sidebar, the groups, a card per event type.
  await page.goto(base + "/");
  await page.getByRole("heading", { name: "Events", level: 1 }).waitFor();
  for (const g of ["User events", "Authentication events", "Data events", "Datahub events", "Auth events"]) {
    await page.getByRole("heading", { name: g, level: 2 }).waitFor();
  }
  const nav = page.getByRole("navigation", { name: "Sections" });
  check(await nav.getByRole("link", { name: "Events" }).getAttribute("aria-current") === "page", "Events is the current section");
  await page.getByText("connected", { exact: true }).waitFor();
  await shot(page, "events");

  // Click the card to expand it: its subscribers.
  const card = page.locator("article", { has: page.getByRole("heading", { name: "POST_USER_CREATE", exact: true }) });
  await card.getByRole("heading", { name: "POST_USER_CREATE" }).click();
  const subscribers = card.getByRole("table", { name: "Subscribers of POST_USER_CREATE" });
  await subscribers.getByRole("row", { name: /welcome_mail/ }).waitFor();

  // Subscribe Function: select the function, a priority, click Subscribe.
  await card.getByText("Subscribe Function", { exact: true }).click();
  await card.getByLabel("Function").selectOption("notify");
  await card.getByLabel("Priority").fill("5");
  await card.getByRole("button", { name: "Subscribe", exact: true }).click();
  await flash(page, "Subscribed notify to POST_USER_CREATE.");
  const row = subscribers.getByRole("row", { name: /notify/ });
  await row.waitFor();
  const cells = await row.getByRole("cell").allTextContents();
  check(cells[0] === "Active" && cells[1] === "5", "notify is active with priority 5: " + JSON.stringify(cells));
  check(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ/.test(cells[2]), "a subscribed date: " + cells[2]);
  await shot(page, "events-subscribed");
  await page.evaluate(() => window.scrollTo(0, 0));
  await tour(page, "events");

  // Deactivate it.
  await row.getByRole("button", { name: "Deactivate" }).click();
  await flash(page, "The subscription of notify to POST_USER_CREATE is inactive.");
  check((await row.getByRole("cell").first().textContent()) === "Inactive", "notify is inactive");

  // Unsubscribe, with a confirmation step.
  await row.getByRole("button", { name: "Unsubscribe" }).click();
  await page.getByRole("heading", { name: "Unsubscribe notify from POST_USER_CREATE?" }).waitFor();
  await shot(page, "unsubscribe-confirm");
  await page.getByRole("button", { name: "Confirm" }).click();
  await flash(page, "Unsubscribed notify from POST_USER_CREATE.");
  check(await subscribers.getByRole("row", { name: /notify/ }).count() === 0, "notify left the list");
  check(await subscribers.getByRole("row", { name: /welcome_mail/ }).count() === 1, "welcome_mail stays");

  // Functions: send a test event and read the answer.
  await nav.getByRole("link", { name: "Functions" }).click();
  await page.getByRole("heading", { name: "Functions", level: 1 }).waitFor();
  const fn = page.getByRole("article", { name: "notify" });
  await fn.getByLabel("Event type").selectOption("POST_USER_CREATE");
  await fn.getByRole("button", { name: "Send test event" }).click();
  await page.getByRole("heading", { name: "Test event result" }).waitFor();
  check((await page.locator("#probe-verdict").textContent()) === "HTTP 200: accepted", "the webhook's answer");
  await shot(page, "functions");
  await page.evaluate(() => window.scrollTo(0, 0));
  await tour(page, "functions");

  // Executions: the failed run and its error, then a new one appears without a reload.
  await nav.getByRole("link", { name: "Executions" }).click();
  await page.getByRole("heading", { name: "Executions", level: 1 }).waitFor();
  const filters = page.getByRole("form", { name: "Filters" });
  await filters.getByLabel("Status").selectOption("failed");
  await filters.getByLabel("Function").selectOption("welcome_mail");
  await filters.getByRole("button", { name: "Filter" }).click();
  await page.waitForURL(/status=failed/);
  const runs = page.getByRole("table", { name: "Function runs, newest first" });
  const failed = runs.getByRole("row", { name: /mailbox full for ada@example.com/ }).first();
  await failed.waitFor();
  const failedCells = await failed.getByRole("cell").allTextContents();
  check(failedCells.includes("welcome_mail") && failedCells.some((c) => /^(error|dead)$/.test(c)), "a failed run: " + JSON.stringify(failedCells));
  await page.getByRole("img", { name: "Runs per minute by status, last hour" }).waitFor();
  await shot(page, "executions");

  await page.evaluate(() => { window.notReloaded = true; });
  const db = new Client({ connectionString: process.env.DATABASE_URL });
  await db.connect();
  await db.query("INSERT INTO users (email) VALUES ('grace@example.com')");
  await db.end();
  await runs.getByRole("row", { name: /mailbox full for grace@example.com/ }).first().waitFor();
  check(await page.evaluate(() => window.notReloaded === true), "the new run arrived without a reload");
  await page.evaluate(() => window.scrollTo(0, 0));
  await tour(page, "executions");

  // Redeliver a dead run once its endpoint works again, and see it succeed.
  if (process.env.FLAKY_CONTROL) {
    await page.goto(base + "/executions?function=flaky&status=dead");
    const dead = runs.getByRole("row", { name: /flaky/ }).first();
    await dead.waitFor();
    check((await dead.textContent()).includes("try later"), "the dead run shows its error");
    const queue = page.getByRole("table", { name: "Parked and dead runs" });
    await queue.getByRole("row", { name: /flaky/ }).first().waitFor();
    await shot(page, "executions-dead");
    await fetch(process.env.FLAKY_CONTROL, { method: "POST" });
    await dead.getByRole("button", { name: "Redeliver" }).click();
    await page.getByText(/dead run of execution \d+ sent again/).waitFor();
    await runs.locator('tr[data-status="ok"]', { hasText: "flaky" }).first().waitFor();
    // Settled: it leaves the retry queue.
    for (let i = 0; ; i++) {
      await page.reload();
      if (await queue.getByRole("row", { name: /flaky/ }).count() === 0) break;
      check(i < 50, "flaky left the retry queue");
      await page.waitForTimeout(200);
    }
    await shot(page, "executions-redelivered");
  }

  check(errors.length === 0, "no script errors: " + errors.join("; "));
  await browser.close();
  console.log("dashboard flows ok");
}

main().catch(async (e) => {
  console.error(e && e.stack || e);
  if (page) {
    try {
      console.error("at " + page.url());
      console.error((await page.locator("main").innerText()).slice(0, 3000));
      await shot(page, "failure");
    } catch (_) {}
  }
  process.exit(1);
});
