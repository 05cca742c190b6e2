// The cloudpacs browser viewer: a same-origin single-page app with no build step and no dependencies.
//
// Sign-in: OAuth 2.0 authorization code + PKCE (S256) at /oauth2/authorize and /oauth2/token, with state
// and an OpenID Connect nonce. Tokens live in this page's memory only; sessionStorage holds the PKCE
// verifier, state and nonce during the sign-in redirect and is cleared as soon as the page is back.
// The access token is refreshed before it expires; no input for the configured time signs out
// (the refresh token is revoked and everything shown is cleared).
//
// Pixels come only from the rendered and thumbnail resources (JPEG); the study list and series come
// from QIDO-RS (JSON). The page never asks for a DICOM media type. Nothing it shows is ever logged.

const $ = (id) => document.getElementById(id);

const CONFIG = (() => {
  const data = document.body.dataset;
  return {
    clientId: data.clientId,
    issuer: data.issuer,
    redirectUri: data.redirectUri,
    idleMs: Math.max(5, Number(data.idleSeconds) || 900) * 1000,
  };
})();

const PKCE_KEY = "cloudpacs-viewer-sign-in";
const JSON_TYPES = "application/dicom+json, application/json";
const IMAGE_TYPE = "image/jpeg";
const STUDY_PAGE = 50;
const INSTANCE_PAGE = 1000;
const CACHE_LIMIT = 64; // decoded images kept in memory ...
const CACHE_BYTES = 256 * 1024 * 1024; // ... and at most this many bytes of them
const ZOOM_MIN = 0.5;
const ZOOM_MAX = 8;
const PAN_STEP = 40;
const WHEEL_STEP = 50;
const MAX_VIEWPORT = 4096;
const PRESETS = {
  default: null,
  soft: { center: 40, width: 400 },
  lung: { center: -600, width: 1500 },
  bone: { center: 400, width: 1800 },
  brain: { center: 40, width: 80 },
};
const PRESET_ORDER = ["default", "soft", "lung", "bone", "brain"];
const TAG = {
  StudyDate: "00080020",
  AccessionNumber: "00080050",
  Modality: "00080060",
  ModalitiesInStudy: "00080061",
  SOPInstanceUID: "00080018",
  StudyDescription: "00081030",
  SeriesDescription: "0008103E",
  PatientName: "00100010",
  PatientID: "00100020",
  StudyInstanceUID: "0020000D",
  SeriesInstanceUID: "0020000E",
  SeriesNumber: "00200011",
  InstanceNumber: "00200013",
  NumberOfStudyRelatedSeries: "00201206",
  NumberOfStudyRelatedInstances: "00201208",
  NumberOfSeriesRelatedInstances: "00201209",
  NumberOfFrames: "00280008",
  Rows: "00280010",
  Columns: "00280011",
};

class SessionEnded extends Error {}

class SignInError extends Error {}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// -- small helpers --------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function base64url(bytes) {
  let text = "";
  for (const byte of new Uint8Array(bytes)) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(byteCount) {
  return base64url(crypto.getRandomValues(new Uint8Array(byteCount)));
}

function jwtClaims(token) {
  const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  const bytes = Uint8Array.from(atob(part), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

function first(ds, tag) {
  const value = ds?.[tag]?.Value;
  return value && value.length ? value[0] : undefined;
}

function all(ds, tag) {
  return ds?.[tag]?.Value ?? [];
}

function personName(value) {
  const text = typeof value === "string" ? value : value?.Alphabetic ?? value?.Ideographic ?? "";
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = text.split("^");
  const rest = [prefix, given, middle, suffix].filter(Boolean).join(" ");
  return [family, rest].filter(Boolean).join(", ");
}

function dicomDate(value) {
  return /^\d{8}$/.test(value ?? "") ? `${value.slice(0, 4)}-${value.slice(4, 6)}-${value.slice(6)}` : value ?? "";
}

// Sort by (Series, Instance) Number, those without one last, stable otherwise.
function byNumber(a, b) {
  return a.number === b.number ? 0 : a.number < b.number ? -1 : 1;
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

function duration(ms) {
  const seconds = Math.round(ms / 1000);
  return seconds >= 120 ? `${Math.round(seconds / 60)} minutes` : plural(seconds, "second");
}

function setStatus(text, { error = false } = {}) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", error);
}

function describeError(error, what) {
  if (error instanceof HttpError) {
    if (error.status === 404) return `${what}: not found, or not visible to you.`;
    if (error.status === 406 || error.status === 415) return `${what}: this image cannot be displayed.`;
    if (error.status === 403) return `${what}: your account may not view images.`;
    if (error.status === 429 || error.status >= 500) return `${what}: the service is busy or unavailable; try again.`;
    return `${what}: ${error.message}`;
  }
  return `${what}: the network request failed; try again.`;
}

// -- session: sign-in, tokens, refresh, idle sign-out ------------------------------------------------

const session = {
  access: null,
  refresh: null,
  expiresAt: 0,
  refreshTimer: 0,
  refreshing: null,
  epoch: 0,
  idleTimer: 0,
  lastInput: Date.now(),
};

function signedIn() {
  return session.access !== null;
}

async function beginSignIn() {
  const verifier = randomString(48);
  const state = randomString(24);
  const nonce = randomString(24);
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  sessionStorage.setItem(PKCE_KEY, JSON.stringify({ verifier, state, nonce }));
  const params = new URLSearchParams({
    response_type: "code",
    client_id: CONFIG.clientId,
    redirect_uri: CONFIG.redirectUri,
    scope: "openid profile",
    state,
    nonce,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  location.assign(`/oauth2/authorize?${params}`);
}

async function postForm(path, fields, options = {}) {
  return fetch(path, {
    method: "POST",
    headers: { Accept: "application/json" },
    body: new URLSearchParams(fields),
    cache: "no-store",
    credentials: "omit",
    ...options,
  });
}

async function completeSignIn(query) {
  const saved = JSON.parse(sessionStorage.getItem(PKCE_KEY) || "null");
  sessionStorage.removeItem(PKCE_KEY);
  history.replaceState(null, "", location.pathname);
  if (query.has("error")) {
    throw new SignInError(query.get("error_description") || "The sign-in was refused.");
  }
  if (!saved || query.get("state") !== saved.state) {
    throw new SignInError("The sign-in answer does not belong to this page. Sign in again.");
  }
  if (query.has("iss") && query.get("iss") !== CONFIG.issuer) {
    throw new SignInError("The sign-in answer came from an unexpected issuer. Sign in again.");
  }
  const response = await postForm("/oauth2/token", {
    grant_type: "authorization_code",
    code: query.get("code") ?? "",
    redirect_uri: CONFIG.redirectUri,
    client_id: CONFIG.clientId,
    code_verifier: saved.verifier,
  });
  if (!response.ok) throw new SignInError("The sign-in could not be completed. Sign in again.");
  const tokens = await response.json();
  if (tokens.id_token) {
    const claims = jwtClaims(tokens.id_token);
    const audience = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (claims.nonce !== saved.nonce || claims.iss !== CONFIG.issuer || !audience.includes(CONFIG.clientId)) {
      throw new SignInError("The sign-in answer failed its checks. Sign in again.");
    }
  }
  acceptTokens(tokens);
  return tokens.id_token ? jwtClaims(tokens.id_token) : {};
}

function acceptTokens(tokens) {
  const lifetime = Math.max(10, Number(tokens.expires_in) || 300) * 1000;
  session.access = tokens.access_token;
  session.refresh = tokens.refresh_token ?? session.refresh;
  session.expiresAt = Date.now() + lifetime;
  clearTimeout(session.refreshTimer);
  // Renew with a quarter of the lifetime (at most a minute) to spare.
  const margin = Math.min(60_000, lifetime / 4);
  session.refreshTimer = setTimeout(renewInBackground, lifetime - margin);
}

function renewInBackground() {
  refreshTokens().catch((error) => {
    if (!signedIn()) return;
    if (error instanceof SessionEnded || Date.now() >= session.expiresAt) {
      endSession("Your session has ended. Sign in again.");
    } else {
      session.refreshTimer = setTimeout(renewInBackground, 5000);
    }
  });
}

// One refresh at a time: a refresh token works once, and a second use ends the session.
function refreshTokens() {
  if (!session.refresh) return Promise.reject(new SessionEnded());
  if (!session.refreshing) {
    const epoch = session.epoch;
    session.refreshing = (async () => {
      const response = await postForm("/oauth2/token", {
        grant_type: "refresh_token",
        refresh_token: session.refresh,
        client_id: CONFIG.clientId,
      });
      if (epoch !== session.epoch) throw new SessionEnded();
      if (!response.ok) throw new SessionEnded();
      acceptTokens(await response.json());
    })().finally(() => {
      session.refreshing = null;
    });
  }
  return session.refreshing;
}

// A DICOMweb (or auth) GET with the access token; a 401 gets one refresh and one retry.
async function api(path, { accept, signal, priority = "auto" } = {}) {
  for (let attempt = 0; ; attempt += 1) {
    if (session.refreshing) await session.refreshing;
    else if (signedIn() && Date.now() > session.expiresAt - 5000) await refreshTokens();
    if (!signedIn()) throw new SessionEnded();
    const response = await fetch(path, {
      headers: { Authorization: `Bearer ${session.access}`, Accept: accept },
      signal,
      priority,
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401 && attempt === 0) {
      await refreshTokens();
      continue;
    }
    if (response.status === 401) throw new SessionEnded();
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        message = (await response.json()).error || message;
      } catch {
        // not JSON: keep the status
      }
      throw new HttpError(response.status, message);
    }
    return response;
  }
}

function handleFailure(error, what) {
  if (error?.name === "AbortError") return;
  if (error instanceof SessionEnded) {
    if (signedIn()) endSession("Your session has ended. Sign in again.");
    return;
  }
  setStatus(describeError(error, what), { error: true });
}

function noteInput() {
  session.lastInput = Date.now();
  if (!$("idle-warning").hidden) $("idle-warning").hidden = true;
}

function checkIdle() {
  if (!signedIn()) return;
  const idleFor = Date.now() - session.lastInput;
  const warnFor = Math.min(60_000, CONFIG.idleMs / 4);
  const warning = $("idle-warning");
  if (idleFor >= CONFIG.idleMs) {
    endSession(`You were signed out after ${duration(CONFIG.idleMs)} without activity.`);
  } else if (idleFor >= CONFIG.idleMs - warnFor) {
    warning.textContent =
      `You will be signed out in ${duration(CONFIG.idleMs - idleFor)} because of inactivity. ` +
      "Press a key or move the mouse to stay signed in.";
    warning.hidden = false;
  } else {
    warning.hidden = true;
  }
}

async function startSession(user) {
  session.lastInput = Date.now();
  clearInterval(session.idleTimer);
  session.idleTimer = setInterval(checkIdle, 1000);
  $("sign-out").hidden = false;
  showView("studies");
  setStatus("");
  $("user").textContent = user.name || user.preferred_username ? `Signed in as ${user.name || user.preferred_username}` : "";
  $("q-name").focus();
  await searchStudies(false);
}

function endSession(message) {
  const refresh = session.refresh;
  session.epoch += 1;
  session.access = null;
  session.refresh = null;
  session.expiresAt = 0;
  clearTimeout(session.refreshTimer);
  clearInterval(session.idleTimer);
  if (refresh) postForm("/oauth2/revoke", { token: refresh }, { keepalive: true }).catch(() => {});
  closeStudy();
  clearStudies();
  $("user").textContent = "";
  $("sign-out").hidden = true;
  $("idle-warning").hidden = true;
  setStatus("");
  showSignIn(message);
}

function showSignIn(message, { error = false } = {}) {
  $("signin-message").textContent = message;
  $("signin-message").classList.toggle("error", error);
  showView("signin");
  $("sign-in").focus();
}

function showView(name) {
  for (const view of ["signin", "studies", "study"]) $(`${view}-view`).hidden = view !== name;
}

// -- study list (QIDO-RS) ---------------------------------------------------------------------------

const studies = { offset: 0, query: null, lastOpened: null };

function searchQuery() {
  const params = new URLSearchParams();
  const name = $("q-name").value.trim();
  const patientId = $("q-id").value.trim();
  const from = $("q-from").value.replace(/-/g, "");
  const to = $("q-to").value.replace(/-/g, "");
  const modality = $("q-modality").value;
  if (name) {
    if (/[*?]/.test(name)) params.set("PatientName", name);
    else {
      // Every word starts a word of the name: "doe jo" finds DOE^JOHN.
      params.set("PatientName", name);
      params.set("fuzzymatching", "true");
    }
  }
  if (patientId) params.set("PatientID", /[*?]/.test(patientId) ? patientId : `${patientId}*`);
  if (from || to) params.set("StudyDate", from === to ? from : `${from}-${to}`);
  if (modality) params.set("ModalitiesInStudy", modality);
  params.set("includefield", "StudyDescription");
  return params;
}

async function searchStudies(more) {
  const epoch = session.epoch;
  if (!more) {
    studies.query = searchQuery();
    studies.offset = 0;
  }
  const params = new URLSearchParams(studies.query);
  params.set("limit", String(STUDY_PAGE));
  params.set("offset", String(studies.offset));
  $("studies-count").textContent = "Searching…";
  try {
    const response = await api(`/dicom-web/studies?${params}`, { accept: JSON_TYPES });
    const found = await response.json();
    if (epoch !== session.epoch) return;
    const list = $("study-list");
    if (!more) list.replaceChildren();
    for (const ds of found) list.append(studyItem(ds));
    studies.offset += found.length;
    const moreAvailable = (response.headers.get("Warning") ?? "").includes("additional results");
    $("more-studies").hidden = !(moreAvailable || found.length === STUDY_PAGE);
    const shown = list.children.length;
    $("studies-count").textContent =
      shown === 0 ? "No studies match." : `${plural(shown, "study")}${$("more-studies").hidden ? "" : " so far"}.`;
  } catch (error) {
    $("studies-count").textContent = "";
    handleFailure(error, "Searching studies");
  }
}

function studyItem(ds) {
  const study = {
    uid: first(ds, TAG.StudyInstanceUID),
    name: personName(first(ds, TAG.PatientName)) || "(no name)",
    patientId: first(ds, TAG.PatientID) ?? "",
    date: dicomDate(first(ds, TAG.StudyDate)),
    modalities: all(ds, TAG.ModalitiesInStudy).join(", "),
    description: first(ds, TAG.StudyDescription) ?? "",
    series: Number(first(ds, TAG.NumberOfStudyRelatedSeries) ?? 0),
    instances: Number(first(ds, TAG.NumberOfStudyRelatedInstances) ?? 0),
  };
  const button = el(
    "button",
    { type: "button", className: "study-row" },
    el("span", { className: "name" }, study.name),
    el("span", { className: "pid" }, study.patientId),
    el("span", { className: "date" }, study.date),
    el("span", { className: "mod" }, study.modalities),
    el("span", { className: "desc" }, study.description),
    el("span", { className: "counts" }, `${study.series} series · ${study.instances} inst.`),
  );
  button.setAttribute(
    "aria-label",
    [study.name, study.patientId, study.date, study.modalities, study.description,
      `${plural(study.series, "series")}, ${plural(study.instances, "instance")}`].filter(Boolean).join(", "),
  );
  button.addEventListener("click", () => openStudy(study, button));
  return el("li", {}, button);
}

function clearStudies() {
  $("study-list").replaceChildren();
  $("studies-count").textContent = "";
  $("more-studies").hidden = true;
  $("search").reset();
  studies.query = null;
  studies.lastOpened = null;
}

// -- study view: series, images, presets, zoom and pan -----------------------------------------------

const view = {
  epoch: 0,
  study: null,
  series: [],
  seriesIndex: -1,
  images: [],
  index: 0,
  direction: 1,
  preset: "default",
  zoom: 1,
  panX: 0,
  panY: 0,
  wanted: null,
  busy: false,
  drawn: null,
  pinned: null,
  prefetching: new Map(),
  thumbUrls: [],
  thumbsStarted: false,
  wheel: 0,
  pointers: new Map(),
};
const cache = new Map(); // request path -> {promise, bitmap, controller, done}

function studyUrl(...parts) {
  return `/dicom-web/studies/${parts.map(encodeURIComponent).join("/")}`;
}

async function openStudy(study, opener) {
  closeStudy();
  const epoch = ++view.epoch;
  view.study = study;
  studies.lastOpened = opener;
  $("study-title").textContent = [study.name, study.patientId, study.date, study.description]
    .filter(Boolean)
    .join(" · ");
  showView("study");
  setStatus("");
  $("viewport").focus();
  try {
    const response = await api(`${studyUrl(study.uid)}/series`, { accept: JSON_TYPES, priority: "high" });
    const found = await response.json();
    if (epoch !== view.epoch) return;
    view.series = found
      .map((ds) => ({
        uid: first(ds, TAG.SeriesInstanceUID),
        number: Number(first(ds, TAG.SeriesNumber) ?? Infinity),
        modality: first(ds, TAG.Modality) ?? "",
        description: first(ds, TAG.SeriesDescription) ?? "",
        count: Number(first(ds, TAG.NumberOfSeriesRelatedInstances) ?? 0),
        images: null,
      }))
      .sort(byNumber);
    $("series-list").replaceChildren(...view.series.map(seriesItem));
    if (!view.series.length) {
      setStatus("This study has no series.");
      return;
    }
    await openSeries(0);
  } catch (error) {
    if (epoch === view.epoch) handleFailure(error, "Opening the study");
  }
}

function seriesItem(series, index) {
  const number = Number.isFinite(series.number) ? `Series ${series.number}` : "Series";
  const button = el(
    "button",
    { type: "button", className: "series", dataset: { index: String(index) } },
    el("span", { className: "thumb" }),
    el("span", { className: "caption" }, `${number} · ${series.modality}`),
    el("span", { className: "caption description" }, series.description),
    el("span", { className: "caption" }, plural(series.count, "instance")),
  );
  button.setAttribute(
    "aria-label",
    [number, series.modality, series.description, plural(series.count, "instance")].filter(Boolean).join(", "),
  );
  button.addEventListener("click", () => openSeries(index));
  return el("li", {}, button);
}

async function loadImages(series) {
  const images = [];
  const instances = [];
  for (let offset = 0; ; offset += INSTANCE_PAGE) {
    const params = new URLSearchParams({ limit: String(INSTANCE_PAGE), offset: String(offset) });
    const response = await api(`${studyUrl(view.study.uid, "series", series.uid)}/instances?${params}`, {
      accept: JSON_TYPES,
      priority: "high",
    });
    const page = await response.json();
    instances.push(...page);
    if (page.length < INSTANCE_PAGE) break;
  }
  const sorted = instances
    .filter((ds) => first(ds, TAG.Rows) !== undefined) // images only (not reports)
    .map((ds) => ({
      sop: first(ds, TAG.SOPInstanceUID),
      number: Number(first(ds, TAG.InstanceNumber) ?? Infinity),
      frames: Math.max(1, Number(first(ds, TAG.NumberOfFrames) ?? 1) || 1),
      rows: Number(first(ds, TAG.Rows)),
      columns: Number(first(ds, TAG.Columns) ?? first(ds, TAG.Rows)),
    }))
    .sort(byNumber);
  sorted.forEach((instance, position) => {
    for (let frame = 1; frame <= instance.frames; frame += 1) {
      images.push({ instance, position: position + 1, instanceCount: sorted.length, frame });
    }
  });
  return images;
}

async function openSeries(index) {
  const epoch = view.epoch;
  const series = view.series[index];
  if (!series) return;
  view.seriesIndex = index;
  for (const button of $("series-list").querySelectorAll("button")) {
    button.setAttribute("aria-current", String(Number(button.dataset.index) === index));
  }
  try {
    series.images ??= await loadImages(series);
  } catch (error) {
    if (epoch === view.epoch) handleFailure(error, "Loading the series");
    return;
  }
  if (epoch !== view.epoch || view.seriesIndex !== index) return;
  view.images = series.images;
  view.index = 0;
  view.wanted = null;
  abortPrefetchesExcept(new Set());
  const slider = $("slider");
  slider.max = String(Math.max(1, view.images.length));
  slider.disabled = view.images.length <= 1;
  resetZoom();
  if (!view.images.length) {
    clearCanvas();
    $("overlay-top").textContent = "This series has no images to show.";
    updatePosition();
    return;
  }
  show(0);
}

function updatePosition() {
  const total = view.images.length;
  const image = view.images[view.index];
  const slider = $("slider");
  slider.value = String(view.index + 1);
  let text = total ? `${view.index + 1} / ${total}` : "0 / 0";
  if (image && image.instance.frames > 1) text += ` (frame ${image.frame}/${image.instance.frames})`;
  $("position").textContent = text;
  slider.setAttribute("aria-valuetext", total ? `Image ${text}` : "No images");
}

function renderSize(image) {
  const box = $("viewport");
  const width = Math.max(1, box.clientWidth);
  const height = Math.max(1, box.clientHeight);
  const columns = image.instance.columns || width;
  const rows = image.instance.rows || height;
  const scale = Math.min(width / columns, height / rows);
  // Sharper images once zoomed in: twice or four times the fitted size, never more than the original.
  const bucket = view.zoom <= 1.01 ? 1 : view.zoom <= 2 ? 2 : 4;
  const factor = scale * (window.devicePixelRatio || 1) * bucket;
  const roundUp = (value) => Math.ceil(value / 32) * 32;
  return {
    width: clamp(Math.min(columns, roundUp(columns * factor)), 1, MAX_VIEWPORT),
    height: clamp(Math.min(rows, roundUp(rows * factor)), 1, MAX_VIEWPORT),
  };
}

function requestFor(index) {
  const image = view.images[index];
  const series = view.series[view.seriesIndex];
  const size = renderSize(image);
  const params = new URLSearchParams({ viewport: `${size.width},${size.height}` });
  const preset = PRESETS[view.preset];
  if (preset) params.set("window", `${preset.center},${preset.width},linear`);
  const path =
    `${studyUrl(view.study.uid, "series", series.uid, "instances", image.instance.sop, "frames", String(image.frame))}` +
    `/rendered?${params}`;
  return { path, index, ...size, preset: view.preset, epoch: view.epoch, series: view.seriesIndex };
}

function fetchImage(request, priority) {
  let entry = cache.get(request.path);
  if (entry) {
    cache.delete(request.path); // most recently used goes last
    cache.set(request.path, entry);
    return entry;
  }
  const controller = new AbortController();
  entry = { controller, bitmap: null, done: false };
  entry.promise = (async () => {
    const response = await api(request.path, { accept: IMAGE_TYPE, signal: controller.signal, priority });
    const bitmap = await createImageBitmap(await response.blob());
    entry.bitmap = bitmap;
    return bitmap;
  })();
  entry.promise
    .catch(() => {
      if (cache.get(request.path) === entry) cache.delete(request.path);
    })
    .finally(() => {
      entry.done = true;
    });
  cache.set(request.path, entry);
  trimCache();
  entry.promise.then(trimCache, () => {});
  return entry;
}

function trimCache() {
  const size = (entry) => (entry.bitmap ? entry.bitmap.width * entry.bitmap.height * 4 : 0);
  let bytes = 0;
  for (const entry of cache.values()) bytes += size(entry);
  // Oldest first; the image being loaded for the screen always stays.
  for (const [path, entry] of cache) {
    if (cache.size <= CACHE_LIMIT && bytes <= CACHE_BYTES) break;
    if (path === view.pinned) continue;
    cache.delete(path);
    bytes -= size(entry);
    entry.controller.abort();
    entry.bitmap?.close();
  }
}

function clearCache() {
  for (const entry of cache.values()) {
    entry.controller.abort();
    entry.bitmap?.close();
  }
  cache.clear();
  view.prefetching.clear();
}

function show(index) {
  if (!view.images.length) return;
  const next = clamp(index, 0, view.images.length - 1);
  view.direction = next < view.index ? -1 : 1;
  view.index = next;
  updatePosition();
  const request = requestFor(next);
  const held = cache.get(request.path);
  if (held?.bitmap) {
    draw(held.bitmap, request);
    prefetchAround();
    return;
  }
  view.wanted = request;
  pump();
}

// One image request at a time for what is on screen; while it loads, only the latest wish is kept,
// so scrolling fast shows images as quickly as they come without queueing every one in between.
async function pump() {
  if (view.busy) return;
  view.busy = true;
  const loading = setTimeout(() => {
    $("loading").hidden = false;
  }, 250);
  try {
    while (view.wanted) {
      const request = view.wanted;
      view.wanted = null;
      if (request.epoch !== view.epoch) continue;
      abortPrefetchesExcept(new Set([request.path]));
      view.pinned = request.path;
      try {
        const bitmap = await fetchImage(request, "high").promise;
        if (request.epoch === view.epoch && request.series === view.seriesIndex) draw(bitmap, request);
      } catch (error) {
        if (!view.wanted && request.epoch === view.epoch) handleFailure(error, "Loading the image");
      }
    }
  } finally {
    clearTimeout(loading);
    $("loading").hidden = true;
    view.busy = false;
  }
  prefetchAround();
}

function abortPrefetchesExcept(keep) {
  for (const [path, entry] of view.prefetching) {
    if (keep.has(path)) continue;
    if (!entry.done) {
      entry.controller.abort();
      if (cache.get(path) === entry) cache.delete(path);
    }
    view.prefetching.delete(path);
  }
}

function prefetchAround() {
  if (view.busy || !view.images.length) return;
  const step = view.direction;
  const wanted = [1, 2, 3, -1, 4, 5]
    .map((offset) => view.index + offset * step)
    .filter((index) => index >= 0 && index < view.images.length)
    .map(requestFor);
  abortPrefetchesExcept(new Set(wanted.map((request) => request.path)));
  const queue = wanted.filter((request) => !cache.has(request.path));
  const epoch = view.epoch;
  const position = view.index;
  const lane = async () => {
    while (queue.length && epoch === view.epoch && position === view.index && !view.busy) {
      const request = queue.shift();
      const entry = fetchImage(request, "low");
      view.prefetching.set(request.path, entry);
      await entry.promise.catch(() => {});
    }
  };
  lane();
  lane();
}

function draw(bitmap, request) {
  const canvas = $("image");
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  canvas.getContext("2d", { alpha: false }).drawImage(bitmap, 0, 0);
  view.drawn = request;
  layoutImage();
  const image = view.images[request.index];
  const series = view.series[request.series];
  const preset = PRESETS[request.preset];
  const parts = [`Image ${request.index + 1}/${view.images.length}`];
  if (image.instance.frames > 1) parts.push(`frame ${image.frame}/${image.instance.frames}`);
  parts.push(`instance ${image.position}/${image.instanceCount}`);
  if (series && Number.isFinite(series.number)) parts.unshift(`Series ${series.number}`);
  $("overlay-top").textContent = parts.join(" · ");
  updateOverlayBottom(preset);
  $("viewport").setAttribute("aria-label", `${parts.join(", ")}. ${$("overlay-bottom").textContent}`);
  // Integrations and the browser test follow what is on screen through these and the "viewer:drawn" event.
  canvas.dataset.index = String(request.index + 1);
  canvas.dataset.preset = request.preset;
  canvas.dispatchEvent(
    new CustomEvent("viewer:drawn", { bubbles: true, detail: { index: request.index, preset: request.preset } }),
  );
  if (!view.thumbsStarted) {
    view.thumbsStarted = true;
    loadThumbnails(view.epoch);
  }
}

function updateOverlayBottom(preset = PRESETS[view.preset]) {
  const windowText = preset ? `W ${preset.width} / L ${preset.center}` : "Window from image";
  $("overlay-bottom").textContent = `${windowText} · Zoom ${Math.round(view.zoom * 100)}%`;
}

function clearCanvas() {
  const canvas = $("image");
  canvas.width = 0;
  canvas.height = 0;
  delete canvas.dataset.index;
  delete canvas.dataset.preset;
  view.drawn = null;
}

function layoutImage() {
  const canvas = $("image");
  const box = $("viewport");
  if (!canvas.width || !canvas.height) return;
  const scale = Math.min(box.clientWidth / canvas.width, box.clientHeight / canvas.height);
  const width = canvas.width * scale;
  const height = canvas.height * scale;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  canvas.style.transform =
    `translate(${view.panX}px, ${view.panY}px) scale(${view.zoom}) translate(${-width / 2}px, ${-height / 2}px)`;
}

function setZoom(zoom, around = { x: 0, y: 0 }) {
  const next = clamp(zoom, ZOOM_MIN, ZOOM_MAX);
  const ratio = next / view.zoom;
  const oldBucket = renderBucket();
  view.panX = around.x - (around.x - view.panX) * ratio;
  view.panY = around.y - (around.y - view.panY) * ratio;
  view.zoom = next;
  layoutImage();
  updateOverlayBottom();
  if (renderBucket() !== oldBucket && view.images.length) show(view.index);
}

function renderBucket() {
  return view.zoom <= 1.01 ? 1 : view.zoom <= 2 ? 2 : 4;
}

function pan(dx, dy) {
  view.panX += dx;
  view.panY += dy;
  layoutImage();
}

function resetZoom() {
  const changed = view.zoom !== 1;
  view.zoom = 1;
  view.panX = 0;
  view.panY = 0;
  layoutImage();
  updateOverlayBottom();
  if (changed && view.images.length) show(view.index);
}

function setPreset(name) {
  if (!(name in PRESETS)) return;
  view.preset = name;
  $("preset").value = name;
  updateOverlayBottom();
  if (view.images.length) show(view.index);
}

function centerOffset(event) {
  const rect = $("viewport").getBoundingClientRect();
  return { x: event.clientX - rect.left - rect.width / 2, y: event.clientY - rect.top - rect.height / 2 };
}

async function loadThumbnails(epoch) {
  const size = Math.min(256, Math.round(96 * (window.devicePixelRatio || 1)));
  const queue = view.series.map((series, index) => ({ series, index }));
  const lane = async () => {
    while (queue.length && epoch === view.epoch) {
      const { series, index } = queue.shift();
      const slot = $("series-list").querySelector(`button[data-index="${index}"] .thumb`);
      try {
        const response = await api(`${studyUrl(view.study.uid, "series", series.uid)}/thumbnail?viewport=${size},${size}`, {
          accept: IMAGE_TYPE,
          priority: "low",
        });
        const blob = await response.blob();
        if (epoch !== view.epoch || !slot) return;
        const url = URL.createObjectURL(blob);
        view.thumbUrls.push(url);
        slot.replaceWith(el("img", { src: url, alt: "", width: 96, height: 96, decoding: "async" }));
      } catch (error) {
        if (error instanceof SessionEnded) return handleFailure(error, "Loading thumbnails");
        if (slot) slot.textContent = "no image";
      }
    }
  };
  await Promise.all([lane(), lane()]);
}

function closeStudy() {
  view.epoch += 1;
  clearCache();
  for (const url of view.thumbUrls) URL.revokeObjectURL(url);
  Object.assign(view, {
    study: null,
    series: [],
    seriesIndex: -1,
    images: [],
    index: 0,
    direction: 1,
    wanted: null,
    pinned: null,
    thumbUrls: [],
    thumbsStarted: false,
    wheel: 0,
  });
  view.pointers.clear();
  $("series-list").replaceChildren();
  $("study-title").textContent = "";
  $("overlay-top").textContent = "";
  $("overlay-bottom").textContent = "";
  $("position").textContent = "";
  clearCanvas();
}

function backToStudies() {
  const opener = studies.lastOpened;
  closeStudy();
  showView("studies");
  setStatus("");
  if (opener?.isConnected) opener.focus();
  else $("q-name").focus();
}

// -- input -------------------------------------------------------------------------------------------

function onKeyDown(event) {
  if ($("study-view").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  const inField = target instanceof HTMLSelectElement || (target instanceof HTMLInputElement && target.type !== "range");
  if (inField) return;
  const onSlider = target === $("slider");
  const scrollKeys = ["ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight", "PageUp", "PageDown", "Home", "End"];
  if (onSlider && !event.shiftKey && scrollKeys.includes(event.key)) return; // the slider moves itself
  let handled = true;
  if (event.shiftKey && event.key.startsWith("Arrow")) {
    const moves = { ArrowLeft: [-PAN_STEP, 0], ArrowRight: [PAN_STEP, 0], ArrowUp: [0, -PAN_STEP], ArrowDown: [0, PAN_STEP] };
    pan(...moves[event.key]);
  } else if (event.key === "ArrowDown" || event.key === "ArrowRight") show(view.index + 1);
  else if (event.key === "ArrowUp" || event.key === "ArrowLeft") show(view.index - 1);
  else if (event.key === "PageDown") show(view.index + 10);
  else if (event.key === "PageUp") show(view.index - 10);
  else if (event.key === "Home") show(0);
  else if (event.key === "End") show(view.images.length - 1);
  else if (/^[1-5]$/.test(event.key)) setPreset(PRESET_ORDER[Number(event.key) - 1]);
  else if (event.key === "+" || event.key === "=") setZoom(view.zoom * 1.25);
  else if (event.key === "-" || event.key === "_") setZoom(view.zoom / 1.25);
  else if (event.key === "0") resetZoom();
  else if (event.key === "]") openSeries(Math.min(view.series.length - 1, view.seriesIndex + 1));
  else if (event.key === "[") openSeries(Math.max(0, view.seriesIndex - 1));
  else if (event.key === "Escape") backToStudies();
  else handled = false;
  if (handled) event.preventDefault();
}

function onWheel(event) {
  event.preventDefault();
  const unit = event.deltaMode === 1 ? 40 : event.deltaMode === 2 ? 800 : 1;
  if (event.ctrlKey || event.metaKey) {
    setZoom(view.zoom * Math.exp(-event.deltaY * unit * 0.002), centerOffset(event));
    return;
  }
  view.wheel += event.deltaY * unit;
  let steps = 0;
  while (Math.abs(view.wheel) >= WHEEL_STEP) {
    steps += Math.sign(view.wheel);
    view.wheel -= Math.sign(view.wheel) * WHEEL_STEP;
  }
  if (steps) show(view.index + steps);
}

function onPointerDown(event) {
  const box = $("viewport");
  box.setPointerCapture(event.pointerId);
  view.pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
  box.focus({ preventScroll: true });
}

function onPointerMove(event) {
  const previous = view.pointers.get(event.pointerId);
  if (!previous) return;
  if (view.pointers.size === 1) {
    pan(event.clientX - previous.x, event.clientY - previous.y);
  } else if (view.pointers.size === 2) {
    const [other] = [...view.pointers.entries()].filter(([id]) => id !== event.pointerId).map(([, p]) => p);
    const before = Math.hypot(previous.x - other.x, previous.y - other.y);
    const after = Math.hypot(event.clientX - other.x, event.clientY - other.y);
    if (before > 0) {
      const middle = { clientX: (event.clientX + other.x) / 2, clientY: (event.clientY + other.y) / 2 };
      setZoom(view.zoom * (after / before), centerOffset(middle));
      pan((event.clientX - previous.x) / 2, (event.clientY - previous.y) / 2);
    }
  }
  view.pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
}

function onPointerUp(event) {
  view.pointers.delete(event.pointerId);
}

function wire() {
  for (const type of ["keydown", "pointerdown", "pointermove", "wheel", "touchstart"]) {
    window.addEventListener(type, noteInput, { capture: true, passive: true });
  }
  document.addEventListener("keydown", onKeyDown);
  $("sign-in").addEventListener("click", () => beginSignIn());
  $("sign-out").addEventListener("click", () => endSession("You are signed out."));
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    searchStudies(false);
  });
  $("search").addEventListener("reset", () => {
    if (signedIn()) setTimeout(() => searchStudies(false), 0);
  });
  $("more-studies").addEventListener("click", () => searchStudies(true));
  $("back").addEventListener("click", backToStudies);
  $("preset").addEventListener("change", (event) => setPreset(event.target.value));
  $("zoom-in").addEventListener("click", () => setZoom(view.zoom * 1.25));
  $("zoom-out").addEventListener("click", () => setZoom(view.zoom / 1.25));
  $("zoom-fit").addEventListener("click", resetZoom);
  $("slider").addEventListener("input", (event) => show(Number(event.target.value) - 1));
  const box = $("viewport");
  box.addEventListener("wheel", onWheel, { passive: false });
  box.addEventListener("pointerdown", onPointerDown);
  box.addEventListener("pointermove", onPointerMove);
  box.addEventListener("pointerup", onPointerUp);
  box.addEventListener("pointercancel", onPointerUp);
  box.addEventListener("dblclick", resetZoom);
  let resized = 0;
  new ResizeObserver(() => {
    layoutImage();
    clearTimeout(resized);
    // A larger viewport may need a sharper image; a smaller one keeps the one it has.
    resized = setTimeout(() => {
      if (!view.drawn || !view.images.length) return;
      const wanted = requestFor(view.index);
      if (wanted.width > view.drawn.width || wanted.height > view.drawn.height) show(view.index);
    }, 300);
  }).observe(box);
  // Closing or leaving the page ends the session: its tokens existed only in this page's memory.
  window.addEventListener("pagehide", () => {
    if (session.refresh) navigator.sendBeacon("/oauth2/revoke", new URLSearchParams({ token: session.refresh }));
  });
}

async function main() {
  wire();
  if (location.origin !== new URL(CONFIG.redirectUri).origin) {
    location.replace(CONFIG.redirectUri); // sign-in returns to the registered address only
    return;
  }
  const query = new URLSearchParams(location.search);
  if (query.has("code") || query.has("error")) {
    let user;
    try {
      user = await completeSignIn(query);
    } catch (error) {
      const message = error instanceof SignInError ? error.message : "The sign-in could not be completed.";
      showSignIn(message, { error: true });
      return;
    }
    await startSession(user);
    return;
  }
  showSignIn("Taking you to the sign-in page…");
  await beginSignIn();
}

main();
