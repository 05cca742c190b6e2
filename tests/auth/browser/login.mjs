// Drives Debian's headless Chromium through the OAuth 2.0 authorization-code + PKCE sign-in with TOTP,
// starting at a small client app (client/) that plays the part of a browser viewer such as OHIF.
// Usage: node login.mjs <start-url> <username> <password> <base32 TOTP secret> <user-data-dir> [screenshot.png]
// Prints one JSON line: {"tokens": {...}, "pages": [...], "cspViolations": [...]}.
import { createHmac } from "node:crypto";
import { chromium } from "playwright-core";

const [startUrl, username, password, secret, userDataDir, screenshot] = process.argv.slice(2);

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

function totp(base32Secret, when = Date.now()) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(when / 1000 / 30)));
  const mac = createHmac("sha1", base32Decode(base32Secret)).update(counter).digest();
  const offset = mac[mac.length - 1] & 0x0f;
  const code = (mac.readUInt32BE(offset) & 0x7fffffff) % 1000000;
  return code.toString().padStart(6, "0");
}

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: "/usr/bin/chromium",
  headless: true,
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
const result = { pages: [], cspViolations: [], consoleErrors: [] };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20000);
  page.on("console", (msg) => {
    if (msg.type() === "error") result.consoleErrors.push(msg.text());
    if (msg.text().includes("Content Security Policy")) result.cspViolations.push(msg.text());
  });
  await page.goto(startUrl);
  await page.waitForSelector("input#username");
  result.pages.push({ url: page.url(), title: await page.title() });
  await page.fill("input#username", username);
  await page.fill("input#password", password);
  await page.click("button[type=submit]");
  await page.waitForSelector("input#code");
  result.pages.push({ url: page.url(), title: await page.title() });
  await page.fill("input#code", totp(secret));
  await page.click("button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#result")?.dataset.done === "yes");
  result.pages.push({ url: page.url(), title: await page.title() });
  result.tokens = JSON.parse(await page.textContent("#result"));
  if (screenshot) await page.screenshot({ path: screenshot });
} finally {
  await context.close();
}
console.log(JSON.stringify(result));
