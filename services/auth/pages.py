"""Server-rendered sign-in pages: no script at all, one stylesheet, every value HTML-escaped.

Responses carry a strict Content-Security-Policy (nothing but the same-origin stylesheet; forms may
post to this origin and, on the last step, redirect to the application's registered origin), are
never cached, and cannot be framed.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from fastapi.responses import HTMLResponse

STYLESHEET = "/auth/static/login.css"


def csp(form_origins: Sequence[str] = ()) -> str:
    targets = " ".join(["'self'", *form_origins])
    return (
        "default-src 'none'; style-src 'self'; img-src 'self'; "
        f"form-action {targets}; frame-ancestors 'none'; base-uri 'none'"
    )


def page_headers(form_origins: Sequence[str] = ()) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp(form_origins),
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def render(
    title: str,
    body: str,
    *,
    status: int = 200,
    form_origins: Sequence[str] = (),
) -> HTMLResponse:
    document = (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} - cloudpacs</title>"
        f'<link rel="stylesheet" href="{STYLESHEET}"></head>'
        f"<body><main><h1>{_e(title)}</h1>{body}</main></body></html>\n"
    )
    return HTMLResponse(document, status_code=status, headers=page_headers(form_origins))


def _error(message: str | None) -> str:
    return f'<p class="error" role="alert">{_e(message)}</p>' if message else ""


def _form(action: str, csrf: str, fields: str, button: str) -> str:
    return (
        f'<form method="post" action="{_e(action)}">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">{fields}'
        f'<button type="submit">{_e(button)}</button></form>'
    )


def login_page(csrf: str, client_name: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    fields = (
        '<label for="username">Username</label>'
        '<input id="username" name="username" autocomplete="username" required autofocus>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required>'
    )
    intro = f"<p>Sign in to continue to {_e(client_name)}.</p>"
    return render(
        "Sign in",
        intro + _error(error) + _form("/oauth2/login/password", csrf, fields, "Sign in"),
        status=status,
    )


def password_change_page(
    csrf: str, min_length: int, error: str | None = None, status: int = 200
) -> HTMLResponse:
    fields = (
        '<label for="new_password">New password</label>'
        f'<input id="new_password" name="new_password" type="password" autocomplete="new-password" '
        f'minlength="{min_length}" required autofocus>'
    )
    intro = (
        f"<p>Choose a new password of at least {min_length} characters. Long passphrases are good; "
        "common passwords are refused.</p>"
    )
    return render(
        "Choose a new password",
        intro + _error(error) + _form("/oauth2/login/new-password", csrf, fields, "Save"),
        status=status,
    )


def enroll_page(
    csrf: str, secret: str, uri: str, error: str | None = None, status: int = 200
) -> HTMLResponse:
    grouped = " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))
    fields = (
        '<label for="code">6-digit code from the app</label>'
        '<input id="code" name="code" inputmode="numeric" autocomplete="one-time-code" '
        'pattern="[0-9 ]{6,7}" required autofocus>'
    )
    intro = (
        "<p>This account needs two-step verification. Add it to an authenticator app "
        "(TOTP): open the link on your phone, or type the key.</p>"
        f'<p class="secret" id="totp-secret">{_e(grouped)}</p>'
        f'<p><a id="totp-uri" href="{_e(uri)}">Add to authenticator app</a></p>'
    )
    return render(
        "Set up two-step verification",
        intro + _error(error) + _form("/oauth2/login/enroll", csrf, fields, "Verify"),
        status=status,
    )


def recovery_codes_page(csrf: str, codes: Sequence[str], form_origins: Sequence[str]) -> HTMLResponse:
    items = "".join(f"<li><code>{_e(c)}</code></li>" for c in codes)
    intro = (
        "<p>Two-step verification is on. Keep these recovery codes somewhere safe: each one signs you "
        "in once if you lose your phone. They are shown only now.</p>"
        f'<ul class="codes" id="recovery-codes">{items}</ul>'
    )
    return render(
        "Save your recovery codes",
        intro + _form("/oauth2/login/continue", csrf, "", "Continue"),
        form_origins=form_origins,
    )


def mfa_page(
    csrf: str, form_origins: Sequence[str], error: str | None = None, status: int = 200
) -> HTMLResponse:
    fields = (
        '<label for="code">Code from your authenticator app (or a recovery code)</label>'
        '<input id="code" name="code" autocomplete="one-time-code" required autofocus>'
    )
    return render(
        "Two-step verification",
        _error(error) + _form("/oauth2/login/mfa", csrf, fields, "Verify"),
        status=status,
        form_origins=form_origins,
    )


def error_page(message: str, status: int = 400) -> HTMLResponse:
    return render(
        "Cannot sign in",
        f'<p class="error" role="alert">{_e(message)}</p><p>Return to the application and try again.</p>',
        status=status,
    )
