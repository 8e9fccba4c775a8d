"""`slimship rollout …`: start, watch, pause, resume and abort a staged rollout on a running server (its admin API)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from slimship.cli._app import app

rollout_app = typer.Typer(
    name="rollout",
    help="Staged rollouts on a running `slimship serve`: shadow → canary → 100% with fidelity, latency and error gates; "
    "automatic promotion or rollback, every decision stored in the registry with its evidence."
    "\n\nExample: `slimship rollout status minilm --watch 5`",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(rollout_app)

UrlOpt = Annotated[str, typer.Option("--url", envvar="SLIMSHIP_SERVER", help="The server's base URL.")]
TokenOpt = Annotated[
    str, typer.Option("--admin-token-env", help="Environment variable holding the admin API's bearer token.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's JSON answer.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (stored with the decision in the registry).")]


def _call(
    method: str, url: str, path: str, token_env: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    from slimship.errors import ServingError

    token = os.environ.get(token_env)
    if not token:
        raise ServingError(f"the admin API needs a token: set {token_env} to the server's admin token")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as err:
        try:
            msg = json.loads(err.read()).get("error", "")
        except ValueError:
            msg = ""
        raise ServingError(f"{method} {path}: HTTP {err.code}: {msg or err.reason}") from err
    except urllib.error.URLError as err:
        raise ServingError(
            f"can't reach the server at {url}: {err.reason} (is `slimship serve` running? --url)"
        ) from err


def _show(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    if st.get("state") == "none":
        typer.echo(f"{st['model']}: no rollout" + (f" ({st['waiting']})" if st.get("waiting") else ""))
        return
    stg = st["stage"]
    typer.echo(
        f"{st['model']}: rollout #{st['rollout']} {st['state']} — v{st['candidate']['served_as']} against "
        f"v{st['baseline']['served_as']} ({st['registry_model']} v{st['candidate']['version']} vs v{st['baseline']['version']})"
    )
    typer.echo(
        "  stages: " + " → ".join(f"[{s}]" if i == stg["index"] else s for i, s in enumerate(st["stages"]))
    )
    if st.get("reason"):
        typer.echo(f"  {st['reason']}")
    w = st.get("window")
    if w:
        c, f = w["candidate"], w["fidelity"]
        typer.echo(
            f"  stage {stg['name']}: candidate answers {stg['traffic']:g}%, {stg['compare']:g}% compared; "
            f"{c['requests']}/{stg['min_requests']} candidate requests, {c['errors']} errors, p99 {c['latency_p99_ms']} ms; "
            f"fidelity {f['mean']} over {f['pairs']} pairs"
        )
        for name, g in (w.get("gates") or {}).items():
            verdict = "BREACHED" if not g["ok"] else "holds" if g["judged"] else "not judged yet"
            typer.echo(f"    {name}: {g['value']} (limit {g['limit']}) {verdict}")
    for e in st.get("history", []):
        d = e["detail"]
        typer.echo(f"  {e['at']}  {e['kind']:<22} {d.get('stage_name', '')} {d.get('reason') or ''}".rstrip())


@rollout_app.command("start")
def start(
    model: Annotated[str, typer.Argument(help="The served model name.")],
    candidate: Annotated[
        str,
        typer.Option("--candidate", "-c", help="The served version to roll out (loaded from the registry)."),
    ],
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            "-b",
            help="The version to compare against (default: the loaded registry production version).",
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            "-p",
            help="A rollout policy YAML (stages, gates, min_pairs, promote); "
            "default: shadow 200 → 5% → 25% → 50% → 100%, fidelity ≥ 0.98, errors ≤ 1%, "
            "p99 ≤ 1.5x the baseline's. See slimship/serve/rollout.py.",
        ),
    ] = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    admin_token_env: TokenOpt = "SLIMSHIP_ADMIN_TOKEN",
    as_json: JsonOpt = False,
) -> None:
    """Start a rollout of CANDIDATE on MODEL. The policy is checked here first; the server answers with the first stage.

    Example: `SLIMSHIP_ADMIN_TOKEN=s3cret slimship rollout start minilm -c 3 -p examples/rollout/policy.yaml`
    """
    from slimship.serve.config import parse_policy

    data = None
    if policy is not None:
        from slimship.errors import ConfigError

        if not policy.is_file():
            raise ConfigError(f"rollout policy {policy} does not exist")
        parse_policy(policy.read_text(), str(policy))
        import yaml

        data = yaml.safe_load(policy.read_text())
    body = {"candidate": candidate, "baseline": baseline, "policy": data}
    _show(_call("POST", url, f"/v2/admin/models/{model}/rollout", admin_token_env, body), as_json)


@rollout_app.command("status")
def status(
    model: Annotated[str, typer.Argument(help="The served model name.")],
    url: UrlOpt = "http://127.0.0.1:8000",
    admin_token_env: TokenOpt = "SLIMSHIP_ADMIN_TOKEN",
    watch: Annotated[
        float, typer.Option("--watch", "-w", help="Refresh every N seconds until the rollout ends (0: once).")
    ] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """The rollout's stage, window figures, gates and decision history.

    Example: `slimship rollout status minilm --watch 5`
    """
    while True:
        st = _call("GET", url, f"/v2/admin/models/{model}/rollout", admin_token_env)
        _show(st, as_json)
        if watch <= 0 or st.get("state") not in ("running", "paused"):
            return
        time.sleep(watch)
        typer.echo("")


_REASONS = {"pause": "investigating p99", "resume": "p99 explained", "abort": "wrong input scaling"}


def _action(name: str) -> Any:
    def command(
        model: Annotated[str, typer.Argument(help="The served model name.")],
        reason: ReasonOpt = "",
        url: UrlOpt = "http://127.0.0.1:8000",
        admin_token_env: TokenOpt = "SLIMSHIP_ADMIN_TOKEN",
        as_json: JsonOpt = False,
    ) -> None:
        _show(
            _call(
                "POST", url, f"/v2/admin/models/{model}/rollout/{name}", admin_token_env, {"reason": reason}
            ),
            as_json,
        )

    command.__doc__ = {
        "pause": "Hold the rollout at its stage and split (no decisions until resumed).",
        "resume": "Go on from the paused stage; its gates are judged afresh.",
        "abort": "Send all traffic back to the baseline and end the rollout (recorded as aborted).",
    }[name] + f'\n\nExample: `slimship rollout {name} minilm --reason "{_REASONS[name]}"`'
    return command


for _name in ("pause", "resume", "abort"):
    rollout_app.command(_name)(_action(_name))
