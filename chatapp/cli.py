"""Flask CLI commands."""
import json
import shlex
from datetime import timedelta
from urllib.parse import quote

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from flask_jwt_extended import create_access_token

from chatapp import queries, user_data
from chatapp.extensions import db
from chatapp.values import USER_ID_MAX_CHARS


def curl_command(base_url: str, user_id: str, token: str) -> str:
    """A ready-to-paste curl command that starts a conversation as `user_id`."""
    url = f"{base_url.rstrip('/')}/api/{quote(user_id, safe='')}/chat"
    body = json.dumps({"message": "Hello!"})
    return (
        f"curl -s {shlex.quote(url)} \\\n"
        f"  -H {shlex.quote('Authorization: Bearer ' + token)} \\\n"
        f"  -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(body)}"
    )


def check_user_id(user_id: str) -> None:
    """A user id as the API's paths take it."""
    if not 1 <= len(user_id) <= USER_ID_MAX_CHARS or "/" in user_id:
        raise click.BadParameter(f"must be 1 to {USER_ID_MAX_CHARS} characters, without '/'", param_hint="USER_ID")


@click.command("create-token")
@with_appcontext
@click.argument("user_id")
@click.option("--expires-in", default=3600, show_default=True, type=click.IntRange(min=1), help="Lifetime in seconds.")
@click.option("--curl", "curl_base_url", metavar="BASE_URL", help="Print a curl command for BASE_URL instead.")
def create_token(user_id: str, expires_in: int, curl_base_url: str | None) -> None:
    """Print a bearer token for USER_ID, signed with the configured key (JWT_SECRET_KEY, or
    JWT_PRIVATE_KEY for an asymmetric algorithm)."""
    check_user_id(user_id)
    config = current_app.config
    if config["JWT_JWKS_URL"] or config["JWT_OIDC_ISSUER"]:
        raise click.ClickException("the tokens come from the identity provider (JWT_JWKS_URL or JWT_OIDC_ISSUER): "
                                   "there is no key here to sign one with; ask the provider for a token")
    if config["JWT_PUBLIC_KEY"] and not config["JWT_PRIVATE_KEY"]:
        raise click.ClickException("JWT_PUBLIC_KEY only verifies tokens: there is no key here to sign one with "
                                   "(set JWT_PRIVATE_KEY, or ask the identity provider for a token)")
    try:
        token = create_access_token(identity=user_id, expires_delta=timedelta(seconds=expires_in))
    except RuntimeError as exc:  # e.g. only JWT_PUBLIC_KEY is set: nothing to sign with
        raise click.ClickException(str(exc)) from None
    click.echo(curl_command(curl_base_url, user_id, token) if curl_base_url else token)


@click.command("purge-idempotency-keys")
@with_appcontext
def purge_idempotency_keys() -> None:
    """Delete idempotency keys older than IDEMPOTENCY_TTL (expired keys are ignored anyway;
    run this from a scheduler to keep the table small). `purge` does it too."""
    removed = user_data.purge_expired_keys(db.session, current_app.config["IDEMPOTENCY_TTL"])
    click.echo(f"removed {removed} expired idempotency keys")


@click.command("purge")
@with_appcontext
def purge() -> None:
    """Delete what has outlived its time, a short transaction at a time: conversations not updated
    for RETENTION_DAYS days, with their messages and idempotency keys (one with a turn in flight
    stays), and idempotency keys older than IDEMPOTENCY_TTL. Run it daily from a scheduler."""
    config = current_app.config
    expired = user_data.purge_expired_keys(db.session, config["IDEMPOTENCY_TTL"])  # first: fewer keys left to go below
    days = config["RETENTION_DAYS"]
    if days is None:
        click.echo("conversations: all kept (RETENTION_DAYS is unset)")
    else:
        purged = user_data.purge_stale_conversations(db.session, days, config["TURN_LEASE_SECONDS"])
        click.echo(f"conversations not updated for {days} day{'' if days == 1 else 's'}: deleted {purged.conversations}, "
                   f"with {purged.messages} messages and {purged.keys} idempotency keys")
    click.echo(f"expired idempotency keys: deleted {expired}")


# A user's own limit is stored as a BIGINT.
BUDGET_MAX_TOKENS = 2**63 - 1


@click.command("set-budget")
@with_appcontext
@click.argument("user_id")
@click.argument("tokens", metavar="TOKENS|unlimited|default")
def set_budget(user_id: str, tokens: str) -> None:
    """Give USER_ID a token budget of their own, for TOKEN_BUDGET's period: a number of tokens,
    `unlimited`, or `default` (back to TOKEN_BUDGET's limit)."""
    check_user_id(user_id)
    budget = current_app.extensions["usage"].budget
    choice = tokens.strip().lower()
    if choice == "default":
        had_one = queries.delete_token_budget(db.session, user_id)
        db.session.commit()
        default = "unlimited" if budget.default_limit is None else f"{budget.default_limit} tokens"
        click.echo(f"{user_id}: TOKEN_BUDGET's limit ({default})" + ("" if had_one else "; they had none of their own"))
    else:
        if choice != "unlimited" and not (choice.isascii() and choice.isdigit() and int(choice) <= BUDGET_MAX_TOKENS):
            raise click.BadParameter("must be a whole number of tokens, unlimited or default", param_hint="TOKENS")
        limit = None if choice == "unlimited" else int(choice)
        queries.set_token_budget(db.session, user_id, limit)
        db.session.commit()
        click.echo(f"{user_id}: {'unlimited' if limit is None else f'{limit} tokens'} a {budget.period or 'period'}")
    if not budget.enabled:
        click.echo("note: TOKEN_BUDGET is unset, so no budget applies to anyone until it is set "
                   "(e.g. 'unlimited per month' to limit only the users given a limit of their own)", err=True)


COMMANDS = (create_token, purge_idempotency_keys, purge, set_budget)


def register_commands(app: Flask) -> None:
    """Attach the CLI commands to the app."""
    for command in COMMANDS:
        app.cli.add_command(command)
