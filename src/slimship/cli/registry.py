"""`slimship registry …`: list, show, register, stage, archive and garbage-collect model versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from slimship.cli._app import app

registry_app = typer.Typer(
    name="registry",
    help="Versions of models with lineage and stages; artifacts stored by sha256, metadata in SQLite or PostgreSQL."
    "\n\nExample: `slimship registry list --root ~/reg`",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(registry_app)

RootOpt = Annotated[
    Path | None,
    typer.Option(
        "--root",
        envvar="SLIMSHIP_REGISTRY",
        help="Registry directory (artifacts; the SQLite file unless --url). "
        "Default: $SLIMSHIP_REGISTRY or ~/.local/share/slimship/registry.",
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="SLIMSHIP_REGISTRY_URL",
        help="Database URL for the metadata, e.g. postgresql://user@127.0.0.1:5432/slimship "
        "(needs the `postgres` extra). Default: SQLite inside --root.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _open(root: Path | None, url: str | None) -> Any:
    from slimship.registry import Registry

    return Registry(root, url=url)


def _ref(ref: str) -> int | str:
    return int(ref) if ref.isdigit() else ref


@registry_app.command("list")
def list_(
    model: Annotated[
        str | None, typer.Argument(help="A model: list its versions. Omitted: list the models.")
    ] = None,
    root: RootOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List models, or the versions of one model with their stage, format, size and digest.

    Example: `slimship registry list minilm`
    """
    reg = _open(root, url)
    if model is None:
        rows = reg.models()
        if as_json:
            typer.echo(json.dumps(rows, indent=1))
            return
        if not rows:
            typer.echo(
                f"no models in {reg.root} yet; add one with `slimship registry register CANDIDATE_DIR NAME`"
            )
        for m in rows:
            typer.echo(
                f"{m['name']:30s} {m['versions']:3d} versions  latest v{m['latest']}  production "
                f"{'v' + str(m['production']) if m['production'] else '—'}"
            )
        return
    versions = reg.versions(model)
    if as_json:
        typer.echo(json.dumps([v.as_dict() for v in versions], indent=1, default=str))
        return
    for v in versions:
        size = sum(f["size"] for f in v.files.values())
        typer.echo(
            f"v{v.number:<4d} {v.stage:10s} {v.format:6s} {size / 1e6:8.2f} MB  {v.digest[:12]}  {v.created}"
            f"{'  parent v' + str(v.parent) if v.parent else ''}"
        )


@registry_app.command()
def show(
    model: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="Version number, latest, production or staging.")] = "latest",
    root: RootOpt = None,
    url: UrlOpt = None,
) -> None:
    """Everything about one version: lineage, files with sha256, measurements, tags and its history.

    Example: `slimship registry show minilm production`
    """
    reg = _open(root, url)
    v = reg.get(model, _ref(version))
    out = v.as_dict() | {"events": reg.events(model, v.number)}
    typer.echo(json.dumps(out, indent=1, default=str))


@registry_app.command()
def register(
    candidate: Annotated[
        Path, typer.Argument(help="A candidate directory (a run's step, `slimship export -o` output, …).")
    ],
    model: Annotated[str, typer.Argument(help="Model name (letters, digits, _ . -); created on first use.")],
    parent: Annotated[int | None, typer.Option(help="The version this one was derived from.")] = None,
    stage: Annotated[
        str,
        typer.Option(
            help="Initial stage: none, staging or production (production archives the current one)."
        ),
    ] = "none",
    tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable.")] = None,
    root: RootOpt = None,
    url: UrlOpt = None,
) -> None:
    """Copy a candidate into the registry as the model's next version (atomic: all of it or nothing).

    Example: `slimship registry register runs/minilm-fast/steps/02-quantize-dynamic-ab12cd34ef minilm --stage staging`
    """
    from slimship.errors import ConfigError

    tags = {}
    for t in tag or []:
        k, sep, val = t.partition("=")
        if not sep or not k:
            raise ConfigError(f"--tag {t!r}: use KEY=VALUE, e.g. --tag owner=search-team")
        tags[k] = val
    v = _open(root, url).register(candidate, model, parent=parent, stage=stage, tags=tags)
    typer.echo(f"registered {v.label} ({v.stage}, {v.digest[:12]})")


@registry_app.command()
def stage(
    model: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[int, typer.Argument(help="Version number.")],
    to: Annotated[str, typer.Argument(help="none, staging, production or archived.")],
    reason: Annotated[str, typer.Option(help="Why, kept in the version's history.")] = "",
    root: RootOpt = None,
    url: UrlOpt = None,
) -> None:
    """Move a version to a stage; making one production archives the current production version.

    Example: `slimship registry stage minilm 3 production --reason "passed shadow"`
    """
    v = _open(root, url).set_stage(model, version, to, reason=reason)
    typer.echo(f"{v.label} is now {v.stage}")


@registry_app.command()
def archive(
    model: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[int, typer.Argument(help="Version number.")],
    reason: Annotated[str, typer.Option(help="Why, kept in the version's history.")] = "",
    root: RootOpt = None,
    url: UrlOpt = None,
) -> None:
    """Archive a version (kept, never served by stage; versions are never deleted).

    Example: `slimship registry archive minilm 1`
    """
    v = _open(root, url).archive(model, version, reason=reason)
    typer.echo(f"{v.label} is now {v.stage}")


@registry_app.command()
def gc(
    grace: Annotated[
        float,
        typer.Option(
            help="Only remove files older than this many seconds (protects registrations in flight)."
        ),
    ] = 3600.0,
    root: RootOpt = None,
    url: UrlOpt = None,
) -> None:
    """Delete stored files no version references, and what killed writers left behind.

    Example: `slimship registry gc`
    """
    out = _open(root, url).gc(grace_seconds=grace)
    typer.echo(
        f"removed {out['blobs_removed']} blobs ({out['bytes_freed'] / 1e6:.1f} MB), {out['tmp_removed']} temporary files, "
        f"{out['checkouts_removed']} checkouts"
    )
