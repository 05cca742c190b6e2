// Drives Debian's headless Chromium through the cloudpacs browser viewer (services/render/viewer):
// sign-in with password + TOTP, study search, opening a study (timed to the first image drawn),
// scrolling frames, window presets, zoom and pan, token refresh, a phone-sized screen, idle sign-out,
// and a closed tab's session revoked.
// Usage: node viewer.mjs <config.json>   (written by tests/render/test_viewer_browser.py)
// Prints one JSON line with what it saw; the Python test makes the assertions. A step that cannot
// happen (an element never appears) throws, and the message says which step.
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
// playwright-core is installed once for the browser tests, in tests/auth/browser (scripts/install_browser.sh).
import { chromium } from "../../auth/browser/node_modules/playwright-core/index.mjs";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const base = config.baseUrl;

function base32Decode(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0;
  let value = 0;
  const out = [];
  for (const ch of text.replace(/=+$/, "").toUpperCase()) {
    value = (value << 5) | alphabet.indexOf(ch);
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

// The code of a 30-second step. A step is accepted once, so use the first one after the last used
// (the server accepts one step either side of now).
function totp(secret, step) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(step));
  const mac = createHmac("sha1", base32Decode(secret)).update(counter).digest();
  const offset = mac[mac.length - 1] & 0x0f;
  return ((mac.readUInt32BE(offset) & 0x7fffffff) % 1000000).toString().padStart(6, "0");
}

let currentPage = null;
let lastTotpStep = config.lastTotpStep;

// Fill in the sign-in pages (password, then TOTP) on `tab`. A TOTP step is accepted once and at most one
// step ahead of now, so wait until the next unused one is acceptable.
async function signIn(tab) {
  await tab.fill("input#username", config.username);
  await tab.fill("input#password", config.password);
  await tab.click("button[type=submit]");
  await tab.waitForSelector("input#code");
  const next = lastTotpStep + 1;
  while (Math.floor(Date.now() / 1000 / 30) < next - 1) await new Promise((resolve) => setTimeout(resolve, 500));
  lastTotpStep = Math.max(Math.floor(Date.now() / 1000 / 30), next);
  await tab.fill("input#code", totp(config.totpSecret, lastTotpStep));
  await tab.click("button[type=submit]");
}

async function step(name, action) {
  try {
    return await action();
  } catch (error) {
    // What the viewer itself says (its status line never holds patient data) helps to see why.
    const status = await currentPage?.textContent("#status", { timeout: 1000 }).catch(() => "") ?? "";
    throw new Error(`step "${name}" failed: ${error.message}\nviewer status: ${status}`);
  }
}

const result = {
  responses: [],
  requests: [],
  viewerHeaders: [],
  consoleErrors: [],
  cspViolations: [],
  pageErrors: [],
  screenshots: [],
  stats: {},
};

const context = await chromium.launchPersistentContext(config.userDataDir, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

try {
  const page = context.pages()[0] ?? (await context.newPage());
  currentPage = page;
  page.setDefaultTimeout(20000);
  page.on("console", (msg) => {
    if (msg.type() === "error") result.consoleErrors.push({ text: msg.text(), url: msg.location().url ?? "" });
    if (msg.text().includes("Content Security Policy") || msg.text().includes("Trusted Type")) {
      result.cspViolations.push(msg.text());
    }
  });
  page.on("pageerror", (error) => result.pageErrors.push(String(error)));
  page.on("request", (request) => {
    const url = new URL(request.url());
    result.requests.push({ method: request.method(), path: url.pathname, accept: request.headers().accept ?? "" });
  });
  page.on("response", async (response) => {
    const url = new URL(response.url());
    const headers = await response.allHeaders().catch(() => ({}));
    result.responses.push({
      path: url.pathname,
      status: response.status(),
      contentType: headers["content-type"] ?? "",
      cacheControl: headers["cache-control"] ?? "",
    });
    if (url.pathname.startsWith("/viewer")) result.viewerHeaders.push({ path: url.pathname, status: response.status(), headers });
  });

  const shot = async (name) => {
    const path = join(config.screenshotDir, `${name}.png`);
    await page.screenshot({ path });
    result.screenshots.push(path);
  };
  const canvasStats = () =>
    page.evaluate(() => {
      const canvas = document.getElementById("image");
      const { width, height } = canvas;
      if (!width || !height) return { width, height, mean: 0, std: 0, distinct: 0, fingerprint: "" };
      const data = canvas.getContext("2d").getImageData(0, 0, width, height).data;
      let sum = 0;
      let squares = 0;
      const seen = new Set();
      const grid = [];
      for (let i = 0; i < data.length; i += 4) {
        const v = data[i];
        sum += v;
        squares += v * v;
        seen.add(v);
      }
      for (let gy = 0; gy < 8; gy += 1) {
        for (let gx = 0; gx < 8; gx += 1) {
          const x = Math.floor(((gx + 0.5) * width) / 8);
          const y = Math.floor(((gy + 0.5) * height) / 8);
          grid.push(data[(y * width + x) * 4]);
        }
      }
      const n = data.length / 4;
      const mean = sum / n;
      return {
        width,
        height,
        mean,
        std: Math.sqrt(Math.max(0, squares / n - mean * mean)),
        distinct: seen.size,
        fingerprint: grid.join(","),
        index: canvas.dataset.index,
        preset: canvas.dataset.preset,
      };
    });
  const waitDrawn = (index, preset) =>
    page.waitForFunction(
      ([i, p]) => {
        const canvas = document.getElementById("image");
        return canvas.dataset.index === String(i) && (p === null || canvas.dataset.preset === p);
      },
      [index, preset],
    );
  const box = async (selector) => page.locator(selector).boundingBox();

  // 1. Open the viewer: it sends the browser to the sign-in pages.
  await step("open the viewer and reach the sign-in page", async () => {
    await page.goto(`${base}/viewer/`);
    await page.waitForSelector("input#username");
  });
  result.signInTitle = await page.title();
  await step("sign in with password and TOTP", async () => {
    await signIn(page);
    await page.waitForSelector("#studies-view:not([hidden])");
    await page.waitForSelector("#study-list li");
  });
  result.afterSignInUrl = page.url();
  result.sessionStorageItems = await page.evaluate(() => sessionStorage.length);
  result.localStorageItems = await page.evaluate(() => localStorage.length);
  result.signedInAs = await page.textContent("#user");
  result.initialStudies = await page.locator("#study-list li").count();

  // 2. Search by a part of the patient's name (word prefixes), then by patient ID.
  await step("search studies by patient name", async () => {
    await page.fill("#q-name", config.nameQuery);
    await page.click("#search button[type=submit]");
    await page.waitForFunction(
      (n) => document.querySelectorAll("#study-list li").length === n && !/Searching/.test(document.getElementById("studies-count").textContent),
      config.expectedMatches,
    );
  });
  result.searchRows = await page.locator("#study-list .study-row").allInnerTexts();
  // Keyboard: Tab moves through the labelled controls with a visible focus ring.
  await page.focus("#q-name");
  result.tabOrder = [];
  for (let i = 0; i < 2; i += 1) {
    await page.keyboard.press("Tab");
    result.tabOrder.push(
      await page.evaluate(() => {
        const active = document.activeElement;
        return { id: active.id, outline: getComputedStyle(active).outlineStyle, label: active.labels?.[0]?.textContent ?? "" };
      }),
    );
  }
  await shot("01-study-list");

  // 3. Open the study and time the first image (click -> the viewer's "drawn" event).
  await step("open the study and draw its first image", async () => {
    await page.evaluate(() => {
      window.__drawnAt = new Promise((resolve) =>
        document.addEventListener("viewer:drawn", () => resolve(performance.now()), { once: true }),
      );
      document.addEventListener("click", () => (window.__clickAt = performance.now()), { capture: true, once: true });
    });
    const started = Date.now();
    await page.locator("#study-list .study-row").first().click();
    result.firstImageMs = await page.evaluate(async () => {
      const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("no image drawn within 20 s")), 20000));
      return (await Promise.race([window.__drawnAt, timeout])) - window.__clickAt;
    });
    result.firstImageWallMs = Date.now() - started;
  });
  result.stats.first = await canvasStats();
  result.position = await page.textContent("#position");
  result.sliderMax = await page.getAttribute("#slider", "max");
  await page.waitForFunction(() => [...document.querySelectorAll("#series-list img")].filter((i) => i.complete && i.naturalWidth > 0).length >= 1);
  await page.waitForFunction((n) => document.querySelectorAll("#series-list img").length === n, config.expectedSeries);
  result.thumbnails = await page.evaluate(() =>
    [...document.querySelectorAll("#series-list img")].map((img) => ({ w: img.naturalWidth, h: img.naturalHeight, src: img.src.slice(0, 5) })),
  );
  await shot("02-study-default-window");

  // 4. Scroll with the keyboard through the frames of the multi-frame instance and on to the next instances.
  await step("scroll frames with the keyboard", async () => {
    await page.focus("#viewport");
    for (let i = 0; i < 4; i += 1) await page.keyboard.press("ArrowDown");
    await waitDrawn(5, null);
    result.stats.frame5 = await canvasStats();
    await page.keyboard.press("End");
    await waitDrawn(config.expectedImages, null);
    result.stats.last = await canvasStats();
    result.positionAtEnd = await page.textContent("#position");
    await page.keyboard.press("Home");
    await waitDrawn(1, null);
  });
  await step("scroll with the mouse wheel", async () => {
    const viewport = await box("#viewport");
    await page.mouse.move(viewport.x + viewport.width / 2, viewport.y + viewport.height / 2);
    await page.mouse.wheel(0, 100);
    await waitDrawn(3, null);
    await page.keyboard.press("Home");
    await waitDrawn(1, null);
  });

  // 5. Window presets: keys 3 (lung) and 4 (bone), and the select for soft tissue.
  await step("change the window preset", async () => {
    await page.keyboard.press("3");
    await waitDrawn(1, "lung");
    result.stats.lung = await canvasStats();
    await shot("03-study-lung-window");
    await page.keyboard.press("4");
    await waitDrawn(1, "bone");
    result.stats.bone = await canvasStats();
    await page.selectOption("#preset", "soft");
    await waitDrawn(1, "soft");
    result.stats.soft = await canvasStats();
  });

  // 6. Zoom (keys and ctrl+wheel) and pan (shift+arrows and dragging), then fit again.
  await step("zoom and pan", async () => {
    await page.focus("#viewport");
    const before = await box("#image");
    await page.keyboard.press("+");
    await page.keyboard.press("+");
    const zoomed = await box("#image");
    await page.keyboard.press("Shift+ArrowRight");
    const panned = await box("#image");
    const viewport = await box("#viewport");
    await page.mouse.move(viewport.x + viewport.width / 2, viewport.y + viewport.height / 2);
    await page.mouse.down();
    await page.mouse.move(viewport.x + viewport.width / 2 - 60, viewport.y + viewport.height / 2 + 30, { steps: 4 });
    await page.mouse.up();
    const dragged = await box("#image");
    await shot("04-study-zoomed");
    await page.keyboard.press("0");
    const fitted = await box("#image");
    result.zoom = { before, zoomed, panned, dragged, fitted };
  });

  // 7. The second series, from its thumbnail.
  await step("open the second series", async () => {
    await page.click('#series-list button[data-index="1"]');
    await page.waitForFunction(() => document.querySelector('#series-list button[data-index="1"]').getAttribute("aria-current") === "true");
    await waitDrawn(1, "soft");
    result.stats.series2 = await canvasStats();
    result.series2Position = await page.textContent("#position");
    await page.keyboard.press("[");
    await page.waitForFunction(() => document.querySelector('#series-list button[data-index="0"]').getAttribute("aria-current") === "true");
    await waitDrawn(1, "soft");
  });

  // 8. Token refresh: keep working until the viewer has renewed its access token, then load new images.
  await step("refresh the access token while in use", async () => {
    const refreshed = page.waitForResponse(
      (r) => r.url().endsWith("/oauth2/token") && (r.request().postData() ?? "").includes("grant_type=refresh_token"),
      { timeout: config.accessTokenSeconds * 1000 + 15000 },
    );
    let done = false;
    refreshed.then(() => (done = true), () => (done = true));
    let index = 1;
    while (!done) {
      await page.keyboard.press(index % 2 ? "ArrowDown" : "ArrowUp");
      index += 1;
      await page.waitForTimeout(1500);
    }
    const response = await refreshed;
    result.refreshStatus = response.status();
    result.lastRefreshToken = (await response.json()).refresh_token;
    await page.keyboard.press("Home");
    await page.keyboard.press("5");
    await waitDrawn(1, "brain");
    result.stats.brainAfterRefresh = await canvasStats();
  });

  // 9. A phone-sized screen: the main controls are on screen and nothing scrolls sideways.
  await step("use a phone-sized screen", async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForTimeout(600);
    const controls = ["#back", "#preset", "#zoom-in", "#zoom-out", "#zoom-fit", "#slider", "#viewport", "#series-list", "#sign-out"];
    result.phone = { study: {}, studies: {} };
    for (const selector of controls) {
      const b = await box(selector);
      result.phone.study[selector] = { visible: await page.locator(selector).isVisible(), box: b };
    }
    result.phone.studyScrollWidth = await page.evaluate(() => document.documentElement.scrollWidth);
    await page.keyboard.press("ArrowDown");
    await waitDrawn(2, "brain");
    result.stats.phone = await canvasStats();
    await shot("05-phone-study");
    await page.keyboard.press("Escape");
    await page.waitForSelector("#studies-view:not([hidden])");
    for (const selector of ["#q-name", "#q-id", "#q-modality", "#search button[type=submit]", "#study-list .study-row"]) {
      result.phone.studies[selector] = { visible: await page.locator(selector).first().isVisible(), box: await box(selector) };
    }
    result.phone.studiesScrollWidth = await page.evaluate(() => document.documentElement.scrollWidth);
    result.focusAfterBack = await page.evaluate(() => document.activeElement?.className ?? "");
    await shot("06-phone-study-list");
  });

  // 10. Idle sign-out: no input for the configured time ends the session and clears the screen.
  await step("sign out after the idle time", async () => {
    const started = Date.now();
    await page.waitForSelector("#idle-warning:not([hidden])", { timeout: config.idleSeconds * 1000 + 5000 });
    result.idleWarning = await page.textContent("#idle-warning");
    await shot("07-idle-warning");
    await page.waitForSelector("#signin-view:not([hidden])", { timeout: config.idleSeconds * 1000 + 5000 });
    result.idleSignOutAfterMs = Date.now() - started;
    await page.waitForTimeout(500); // let the revocation request finish
  });
  result.signedOut = await page.evaluate(() => ({
    message: document.getElementById("signin-message").textContent,
    studyRows: document.querySelectorAll("#study-list li").length,
    seriesItems: document.querySelectorAll("#series-list li").length,
    canvas: [document.getElementById("image").width, document.getElementById("image").height],
    nameField: document.getElementById("q-name").value,
    text: document.body.innerText,
    sessionStorage: sessionStorage.length,
  }));
  await shot("08-signed-out");
  const reuse = await fetch(`${base}/oauth2/token`, {
    method: "POST",
    body: new URLSearchParams({ grant_type: "refresh_token", refresh_token: result.lastRefreshToken ?? "", client_id: config.clientId }),
  });
  result.refreshAfterSignOutStatus = reuse.status;
  delete result.lastRefreshToken;

  // 11. Closing the tab ends its session too: the page revokes its refresh token as it goes away (a
  // beacon). Two more sessions, each in a tab of its own: the closed one's refresh token is refused,
  // the open one's (asked for the same way) still works.
  const openSession = async (label) => {
    const tab = await context.newPage();
    currentPage = tab;
    tab.setDefaultTimeout(20000);
    const issued = tab.waitForResponse(
      (r) => r.url().endsWith("/oauth2/token") && (r.request().postData() ?? "").includes("grant_type=authorization_code"),
    );
    await tab.goto(`${base}/viewer/`);
    await tab.waitForSelector("input#username, #studies-view:not([hidden])");
    if (await tab.locator("input#username").count()) await signIn(tab);
    const tokens = await (await issued).json();
    await tab.waitForSelector("#studies-view:not([hidden])");
    if (typeof tokens.refresh_token !== "string" || !tokens.refresh_token) throw new Error(`${label}: no refresh token`);
    return { tab, refresh: tokens.refresh_token };
  };
  const refreshWith = async (token) =>
    (
      await fetch(`${base}/oauth2/token`, {
        method: "POST",
        body: new URLSearchParams({ grant_type: "refresh_token", refresh_token: token, client_id: config.clientId }),
      })
    ).status;
  await step("close a signed-in tab", async () => {
    const closed = await openSession("the tab to close");
    const kept = await openSession("the tab kept open");
    await closed.tab.close({ runBeforeUnload: true });
    await new Promise((resolve) => setTimeout(resolve, 1500)); // let the beacon land
    result.refreshAfterCloseStatus = await refreshWith(closed.refresh);
    result.refreshOfOpenTabStatus = await refreshWith(kept.refresh);
    await kept.tab.close();
  });
} finally {
  await context.close();
}
console.log(JSON.stringify(result));
