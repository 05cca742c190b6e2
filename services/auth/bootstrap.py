"""``python -m services.auth.bootstrap``: create the first administrator, once.

Creates the operator organization and an administrator with a random one-time password, printed
once. At the first sign-in the administrator must choose a new password and enrol an authenticator
app (TOTP). Nothing is baked in: there is no default password. Running it again when an operator
administrator exists changes nothing and prints no secret (reset passwords through the admin API).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pacslib.errors import ConflictError
from services.auth.accounts import create_org, create_user, org_name_key
from services.auth.context import AuthContext, open_context
from services.auth.records import ADMIN, Org, User
from services.auth.settings import AuthSettings


async def existing_operator_admin(ctx: AuthContext) -> User | None:
    """An administrator of an operator organization, if there is one."""
    for org_doc in await ctx.store.find("orgs", {"kind": "operator"}):
        for doc in await ctx.store.find("users", {"org_id": org_doc["id"]}):
            user = User.from_doc(doc)
            if ADMIN in user.roles:
                return user
    return None


async def bootstrap(ctx: AuthContext, org_name: str, username: str) -> tuple[User, str] | None:
    """Create the operator organization and its first administrator; None when one already exists."""
    if await existing_operator_admin(ctx) is not None:
        return None
    operators = await ctx.store.find("orgs", {"kind": "operator"}, limit=1)
    if operators:
        org = Org.from_doc(operators[0])
    else:
        same_name = await ctx.store.find("orgs", {"name_key": org_name_key(org_name)}, limit=1)
        if same_name:
            raise ConflictError(
                f"an organization named {org_name!r} exists already; choose another --org-name"
            )
        org = await create_org(ctx, None, org_name, kind="operator")
    user, one_time = await create_user(ctx, None, org.id, username, [ADMIN], "Administrator")
    assert one_time is not None
    return user, one_time


async def _main(org_name: str, username: str) -> int:
    settings = AuthSettings()
    ctx = await open_context(settings)
    try:
        try:
            created = await bootstrap(ctx, org_name, username)
        except ConflictError as exc:
            print(f"bootstrap: {exc.message}", file=sys.stderr)
            return 1
        await ctx.relay.relay_once()
    finally:
        await ctx.close()
    if created is None:
        print("bootstrap: an administrator already exists; nothing was changed.")
        print("To regain access, have another administrator reset the password through the admin API.")
        return 0
    user, one_time = created
    issuer = settings.issuer_url()
    print("bootstrap: created the operator organization's first administrator.")
    print(f"  username:           {user.username}")
    print(f"  one-time password:  {one_time}")
    print("This password is shown only now. At the first sign-in you choose a new password and set up")
    print("an authenticator app (TOTP). Sign in with the JSON API:")
    print(f"  curl -s {issuer}/auth/login -H 'Content-Type: application/json' \\")
    print(f'       -d \'{{"username": "{user.username}", "password": "<one-time password>"}}\'')
    print("and follow the 'next' steps (see docs/auth.md).")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.auth.bootstrap", description=__doc__)
    parser.add_argument("--org-name", default="Platform operator", help="name of the operator organization")
    parser.add_argument("--username", default="admin", help="username of the first administrator")
    args = parser.parse_args(argv)
    return asyncio.run(_main(args.org_name, args.username))


if __name__ == "__main__":
    sys.exit(main())
