// A minimal public OAuth client (like OHIF): PKCE S256, state, then the code exchange with fetch
// from its own origin (which needs CORS at the token endpoint). CONFIG comes from config.js.
/* global CONFIG */
function base64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function start() {
  const verifier = base64url(crypto.getRandomValues(new Uint8Array(48)));
  const state = base64url(crypto.getRandomValues(new Uint8Array(16)));
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  sessionStorage.setItem("pkce", JSON.stringify({ verifier, state }));
  const params = new URLSearchParams({
    response_type: "code",
    client_id: CONFIG.clientId,
    redirect_uri: CONFIG.redirectUri,
    scope: "openid profile",
    state,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  location.assign(`${CONFIG.authUrl}/oauth2/authorize?${params}`);
}

async function callback() {
  const out = document.getElementById("result");
  const query = new URLSearchParams(location.search);
  const saved = JSON.parse(sessionStorage.getItem("pkce") || "{}");
  let result;
  if (query.get("state") !== saved.state) {
    result = { error: "state mismatch" };
  } else {
    const response = await fetch(`${CONFIG.authUrl}/oauth2/token`, {
      method: "POST",
      headers: { Accept: "application/json", "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "authorization_code",
        code: query.get("code"),
        redirect_uri: CONFIG.redirectUri,
        client_id: CONFIG.clientId,
        code_verifier: saved.verifier,
      }),
    });
    result = { status: response.status, iss: query.get("iss"), ...(await response.json()) };
  }
  out.textContent = JSON.stringify(result);
  out.dataset.done = "yes";
}

window.addEventListener("DOMContentLoaded", () => {
  (location.pathname.endsWith("callback.html") ? callback() : start()).catch((err) => {
    const out = document.getElementById("result");
    if (out) {
      out.textContent = JSON.stringify({ error: String(err) });
      out.dataset.done = "yes";
    }
  });
});
