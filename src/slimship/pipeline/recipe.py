"""Recipes: a YAML file naming a workload, ordered passes with their configs, and constraints.

    version: 1
    workload: mnist                 # built-in name, path/to/factory.py:build, hf:DIR, or model.onnx (+ data)
    passes:
      - pass: prune
        name: pruned                # optional label (default: the pass name, numbered if repeated)
        config: {channel_ratio: 0.5}
      - pass: export
      - pass: quantize-static
    constraints:
      max_quality_drop: 1.0         # points of the workload's primary metric
      min_fidelity: 0.99            # the workload's first fidelity metric (cosine_min, top1_agreement, ...)
      max_latency_ms: {batch_size: 32, value: 150}
      max_size_mb: 25
    fallback_policy: first          # or fastest (see below)

A step may declare ``fallbacks``: alternatives, each a full replacement of that step's pass and config, tried in
order when the constraints fail on the final candidate::

      - pass: quantize-dynamic
        config: {smooth: all}
        fallbacks:
          - {label: ffn-out-float, pass: quantize-dynamic, config: {smooth: all, keep_float: ffn_out}}

Attempt 1 is the recipe as written; each fallback is one more attempt that replaces only its own step (the steps
before it are reused from the step cache, the steps after it run again). ``fallback_policy: first`` (the default)
stops at the first attempt whose constraints hold; ``fastest`` runs every attempt and keeps the fastest that holds
(timed against each other in one interleaved benchmark).

Everything is validated before anything runs: unknown keys, wrong types, unknown passes, pass configs
(each against its pass's own schema), a pass chain whose formats don't connect (an ONNX pass before the
export), and constraints that contradict each other. A search may choose between formats — a step's searched
``pass`` choices may give different formats, and a format-changing step (``export``, ``convert-openvino``) may be
searched in or out with ``skip`` — as long as every combination of those choices connects: every later step
takes each format the choices give (typically the conversion is the last step, so the search chooses the runtime;
each trial is then timed on its own runtime). Errors name the file, the line, the field, the value
given and what is allowed. :func:`recipe_json_schema` publishes the schema for editors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimship.errors import ConfigError

SCHEMA_VERSION = 1


class LatencyLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_size: int = Field(ge=1, description="batch size the latency is measured at, ≥ 1, e.g. 32")
    value: float = Field(gt=0, description="p50 latency in milliseconds at that batch size")


class SpeedupLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_size: int = Field(ge=1, description="batch size the speed-up is measured at, ≥ 1, e.g. 32")
    value: float = Field(
        gt=0,
        description="at least this many times faster than the original (p50, timed interleaved on the same machine), e.g. 3.0",
    )


class Constraints(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_quality_drop: float | None = Field(
        default=None,
        ge=0,
        description="largest allowed drop of the workload's primary metric, in points (e.g. 1.0)",
    )
    min_fidelity: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="smallest allowed value of the workload's fidelity metric against the original, in (0, 1]",
    )
    max_latency_ms: LatencyLimit | None = Field(
        default=None,
        description="largest allowed p50 latency at a batch size, in milliseconds, e.g. {batch_size: 32, value: 150}",
    )
    min_speedup: SpeedupLimit | None = Field(
        default=None,
        description="at least this speed-up over the original at a batch size (relative, so it holds on any machine)",
    )
    max_size_mb: float | None = Field(
        default=None,
        gt=0,
        description="largest allowed artifact file size in megabytes (10^6 bytes), e.g. 25",
    )


class SearchParam(BaseModel):
    """One searched config field: a list of ``choices``, or a numeric range ``low``..``high`` (``step``, ``log``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    choices: list[Any] | None = Field(
        default=None,
        min_length=1,
        description='the values to try, e.g. [0.3, 0.5, 0.7] or ["l1", "l2"]; instead of low/high',
    )
    low: float | None = Field(default=None, description="lower end of a numeric range (inclusive); with high")
    high: float | None = Field(default=None, description="upper end of a numeric range (inclusive); with low")
    step: float | None = Field(
        default=None,
        gt=0,
        description="grid step within low..high, > 0, e.g. 0.1; an integer step with integer bounds searches integers",
    )
    log: bool = Field(
        default=False,
        description="sample the range on a log scale (for learning rates and similar), e.g. true",
    )

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if (self.choices is None) == (self.low is None and self.high is None):
            raise ValueError("give either choices: [...] or low and high")
        if self.choices is None and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"a range needs low < high, got low={self.low}, high={self.high}")
        return self

    def values_to_check(self) -> list[Any]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class Screen(BaseModel):
    """Cheap signals checked before a candidate's full evaluation: quality and fidelity on a small slice."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    samples: int = Field(default=256, ge=16, description="evaluation samples in the slice")
    quality_margin: float = Field(
        default=2.0,
        ge=0,
        description="screened out when the slice's quality drop exceeds max_quality_drop by more than this many points",
    )
    fidelity_margin: float = Field(
        default=0.02,
        ge=0,
        description="screened out when the slice's fidelity is below min_fidelity by more than this",
    )
    macs_margin: float = Field(
        default=1.25,
        ge=1.0,
        description="latency objective: screened out when even this multiple of the speed its MACs predict (from evaluated candidates with the same runtime steps) can't beat the best feasible candidate",
    )


class Search(BaseModel):
    """What `slimship tune` varies: ``"<step>.<config field>"`` → its choices or range."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trials: int = Field(default=25, ge=1, le=1000, description="candidate evaluations at most")
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="wall-clock budget of the whole search in seconds; null: no limit (trials still bound it)",
    )
    objective: Literal["latency", "size"] = Field(
        default="latency", description="what to minimise within the constraints"
    )
    batch_size: int = Field(default=32, ge=1, description="batch size the latency objective is timed at")
    params: dict[str, SearchParam] = Field(
        min_length=1,
        description='searched config fields, "<step>.<config field>" → choices or range, e.g. {"prune.channel_ratio": {choices: [0.3, 0.5]}}',
    )
    patience: int | None = Field(
        default=8,
        ge=1,
        description="stop once a feasible candidate exists and this many candidates in a row haven't beaten it (null: never)",
    )
    screen: Screen | None = Field(
        default=Screen(), description="cheap signals before the full evaluation (null: evaluate everything)"
    )


class StepAlternative(BaseModel):
    """A fallback of a step: another pass and config for it, tried when the constraints fail."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    pass_name: str = Field(
        alias="pass",
        description="registered pass that replaces the step's (same input and output format), e.g. quantize-dynamic",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="the replacement pass's full config (nothing is inherited from the step), e.g. {keep_float: ffn_out}",
    )
    label: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="name of the attempt in results and report (letters, digits, _ . -); default: <step>-fallback-N",
    )


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    pass_name: str = Field(
        alias="pass",
        description="registered pass to run (see `slimship passes`), e.g. prune, export, quantize-static",
    )
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="optional label of the step and its output directory (letters, digits, _ . -); default: the pass name, numbered when repeated",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="the pass's config; its keys are the pass's config fields, e.g. {channel_ratio: 0.5}",
    )
    skip: bool = Field(
        default=False,
        description="leave the step out (its input goes on unchanged); searchable as <step>.skip — a format-changing step (export, convert-openvino) too, when every later step takes both formats",
    )
    fallbacks: list[StepAlternative] = Field(
        default_factory=list,
        description="alternatives tried in order when the constraints fail: each replaces this step's pass and config (slimship run only; tune ignores them)",
    )


@dataclass(frozen=True)
class Attempt:
    """One way to run the recipe: its passes with at most one step replaced by a fallback."""

    number: int
    label: str
    #: the step a fallback replaced (None: the recipe as written)
    replaced_step: str | None
    alternative: StepAlternative | None
    passes: list[Step]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = Field(
        default=SCHEMA_VERSION,
        description="recipe format version; a version newer than this slimship reads is an error",
    )
    workload: str = Field(
        description="what to optimise: a built-in workload name, path/to/factory.py:build, hf:DIR, or model.onnx (with data)"
    )
    data: str | None = Field(default=None, description="for an ONNX workload: the .npz of inputs")
    passes: list[Step] = Field(
        min_length=1, description="ordered pass steps; each step's output is the next step's input"
    )
    constraints: Constraints = Field(
        default=Constraints(),
        description="limits a candidate must meet: quality drop, fidelity, latency, speed-up, size",
    )
    search: Search | None = Field(
        default=None,
        description="what `slimship tune` varies and how long it searches; null: run the passes once as written",
    )
    fallback_policy: Literal["first", "fastest"] = Field(
        default="first",
        description='with step fallbacks: "first" stops at the first attempt whose constraints hold (bounded run time); "fastest" runs every attempt and keeps the fastest that holds',
    )

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.version > SCHEMA_VERSION:
            raise ValueError(
                f"recipe version {self.version} is newer than this slimship reads ({SCHEMA_VERSION})"
            )
        names = [s.name for s in self.passes if s.name]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"step names must be unique; repeated: {dup}")
        labels = self.step_labels()
        alt = [a.label for s in self.passes for a in s.fallbacks if a.label]
        dup = sorted({n for n in alt if alt.count(n) > 1 or n in labels})
        if dup:
            raise ValueError(f"fallback labels must be unique and differ from step names; repeated: {dup}")
        return self

    def attempts(self) -> list[Attempt]:
        """Attempt 1 (the recipe as written), then one attempt per fallback, in step order then listed order."""
        out = [Attempt(1, "as-written", None, None, list(self.passes))]
        for i, (step, label) in enumerate(zip(self.passes, self.step_labels(), strict=True)):
            for j, alt in enumerate(step.fallbacks, 1):
                replaced = step.model_copy(
                    update={"pass_name": alt.pass_name, "config": dict(alt.config), "skip": False}
                )
                out.append(
                    Attempt(
                        len(out) + 1,
                        alt.label or f"{label}-fallback-{j}",
                        label,
                        alt,
                        [*self.passes[:i], replaced, *self.passes[i + 1 :]],
                    )
                )
        return out

    def step_labels(self) -> list[str]:
        """The directory name of each step: its ``name``, else the pass name (numbered when repeated)."""
        labels: list[str] = []
        seen: dict[str, int] = {}
        for s in self.passes:
            if s.name:
                labels.append(s.name)
                continue
            seen[s.pass_name] = seen.get(s.pass_name, 0) + 1
            labels.append(s.pass_name if seen[s.pass_name] == 1 else f"{s.pass_name}-{seen[s.pass_name]}")
        return labels


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at pydantic location ``loc`` (the deepest node that exists)."""
    import yaml

    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next(
                (
                    v
                    for k, v in node.value
                    if getattr(k, "value", None) == (part if isinstance(part, str) else str(part))
                ),
                None,
            )
            if nxt is None and part == "pass_name":
                nxt = next((v for k, v in node.value if getattr(k, "value", None) == "pass"), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        else:
            nxt = None
        if nxt is None:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out.replace("pass_name", "pass") or "(recipe)"


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; every problem is a ConfigError naming file, line and field."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist")
    text = p.read_text()
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: a recipe is a mapping with at least `workload` and `passes`, got {type(data).__name__}"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(e["loc"])
            given = e.get("input")
            shown = "" if isinstance(given, dict | list) or e["type"] == "missing" else f" (given: {given!r})"
            allowed = ""
            if e["type"] == "extra_forbidden":
                allowed = _allowed_keys(loc[:-1])
            problems.append(
                f"{p}:{_line_of(root, loc)}: {_fmt_loc(loc)}: {e['msg'].removeprefix('Value error, ')}{shown}{allowed}"
            )
        raise ConfigError("invalid recipe:\n  " + "\n  ".join(problems)) from err
    _check_steps(recipe, p, root)
    _check_fallbacks(recipe, p, root)
    _check_constraints(recipe, p, root)
    _check_search(recipe, p, root)
    return recipe.model_copy(
        update={
            "workload": _workload_beside(recipe.workload, p.parent),
            "data": None if recipe.data is None else _path_beside(recipe.data, p.parent),
        }
    )


def _path_beside(path: str, base: Path) -> str:
    """A relative path in a recipe names a file beside the recipe (not in the cwd): absolute, anchored there.
    A path that exists only relative to the cwd is kept (recipes written before paths were anchored)."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return str(given)
    beside = base / given
    if beside.exists() or not given.exists():
        return str(beside.resolve())
    return path


def _workload_beside(ref: str, base: Path) -> str:
    """The workload reference with its file path (factory ``file.py:fn``, ``hf:DIR``, ``model.onnx``) anchored at
    the recipe's directory; built-in names unchanged."""
    from slimship.workload import BUILTIN_WORKLOADS

    if ref in BUILTIN_WORKLOADS:
        return ref
    for prefix in ("hf:", "onnx:"):
        if ref.startswith(prefix):
            return prefix + _path_beside(ref[len(prefix) :], base)
    file, sep, func = ref.rpartition(":")
    if sep and file.endswith(".py"):
        return f"{_path_beside(file, base)}:{func}"
    if ref.endswith(".onnx"):
        return _path_beside(ref, base)
    return ref


def _allowed_keys(parent: tuple[Any, ...]) -> str:
    models: dict[tuple[str, ...], type[BaseModel]] = {
        (): Recipe,
        ("constraints",): Constraints,
        ("constraints", "max_latency_ms"): LatencyLimit,
        ("constraints", "min_speedup"): SpeedupLimit,
        ("search",): Search,
    }
    key = tuple(x for x in parent if isinstance(x, str))
    model = (
        (StepAlternative if "fallbacks" in key else Step)
        if parent and parent[0] == "passes"
        else models.get(key)
    )
    if model is None:
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    return f"; allowed keys: {names}"


def _check_steps(
    recipe: Recipe, path: Path, root: Any, *, searched: bool = False, start: str | None = None
) -> None:
    """The chain as written connects. ``searched``: a combination of searched choices, where a skipped
    format-changing step passes its input's format on (the later steps must take it); ``start``: the format the
    chain begins with (what the recipe as written takes)."""
    from slimship.passes import PASSES

    fmt = start  # None: unknown until the workload is resolved; the first pass fixes it
    for i, step in enumerate(recipe.passes):
        where = f"{path}:{_line_of(root, ('passes', i, 'pass_name'))}: passes[{i}].pass"
        if step.pass_name not in PASSES:
            import difflib

            close = difflib.get_close_matches(step.pass_name, list(PASSES), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"{where}: unknown pass {step.pass_name!r}{hint}; passes: {sorted(PASSES)}")
        cls = PASSES[step.pass_name]
        try:
            cls.config_cls.parse(step.config)
        except ConfigError as err:
            line = _line_of(root, ("passes", i, "config"))
            raise ConfigError(f"{path}:{line}: passes[{i}].config ({step.pass_name}): {err}") from err
        prev = recipe.passes[i - 1] if i else None
        if (
            step.pass_name == "quantize-static"
            and prev is not None
            and prev.pass_name == "optimize"
            and prev.config.get("level", "extended") in ("extended", "all")
        ):
            raise ConfigError(
                f"{where}: quantize-static right after optimize (level {prev.config.get('level', 'extended')!r}) meets ONNX "
                "Runtime's fused ops (FusedConv, FusedGemm), which its calibrator can't range; quantize the exported graph "
                "(drop the optimize step, or use level: basic) — ONNX Runtime fuses again when it loads the INT8 model"
            )
        if step.skip:
            if cls.input_format != cls.output_format and not searched:
                raise ConfigError(
                    f"{where}: {step.pass_name!r} turns a {cls.input_format} model into {cls.output_format}; "
                    "it can't be skipped"
                )
            continue
        if fmt is not None and cls.input_format != fmt:
            hint = {
                "onnx": " — add `- pass: export` before it",
                "torch": " — PyTorch passes come before `export`",
                "openvino": " — add `- pass: convert-openvino` before it",
            }.get(cls.input_format, "")
            raise ConfigError(
                f"{where}: {step.pass_name!r} takes {_a(cls.input_format)} model but the step before gives {fmt}{hint}"
            )
        fmt = cls.output_format


def _a(fmt: str) -> str:
    """'a torch', 'an onnx', 'an openvino'."""
    return f"{'an' if fmt[:1] in 'aeiou' else 'a'} {fmt}"


def _check_fallbacks(recipe: Recipe, path: Path, root: Any) -> None:
    """Each fallback names a registered pass with the same input and output format as its step, a config valid
    for that pass, and makes a chain that passes the same checks as the recipe's own steps."""
    from slimship.passes import PASSES

    for i, step in enumerate(recipe.passes):
        cls = PASSES[step.pass_name]
        for j, alt in enumerate(step.fallbacks):
            loc = ("passes", i, "fallbacks", j)
            where = f"{path}:{_line_of(root, (*loc, 'pass_name'))}: passes[{i}].fallbacks[{j}]"
            other = PASSES.get(alt.pass_name)
            if other is None:
                import difflib

                close = difflib.get_close_matches(alt.pass_name, list(PASSES), n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ConfigError(
                    f"{where}.pass: unknown pass {alt.pass_name!r}{hint}; passes: {sorted(PASSES)}"
                )
            if (other.input_format, other.output_format) != (cls.input_format, cls.output_format):
                raise ConfigError(
                    f"{where}.pass: {alt.pass_name!r} takes {other.input_format} and gives {other.output_format}, "
                    f"but the step it replaces ({step.pass_name}) takes {cls.input_format} and gives {cls.output_format}"
                )
            try:
                other.config_cls.parse(alt.config)
            except ConfigError as err:
                line = _line_of(root, (*loc, "config"))
                raise ConfigError(
                    f"{path}:{line}: passes[{i}].fallbacks[{j}].config ({alt.pass_name}): {err}"
                ) from err
    for attempt in recipe.attempts()[1:]:
        try:
            _check_steps(recipe.model_copy(update={"passes": attempt.passes}), path, root)
        except ConfigError as err:
            i = recipe.step_labels().index(attempt.replaced_step or "")
            j = next(k for k, a in enumerate(recipe.passes[i].fallbacks) if a is attempt.alternative)
            line = _line_of(root, ("passes", i, "fallbacks", j, "pass_name"))
            raise ConfigError(
                f"{path}:{line}: passes[{i}].fallbacks[{j}] ({attempt.label}): with this fallback for step "
                f"{attempt.replaced_step!r}: {err}"
            ) from err


def _check_constraints(recipe: Recipe, path: Path, root: Any) -> None:
    c = recipe.constraints
    lossy = [s.pass_name for s in recipe.passes if s.pass_name not in ("export", "optimize")]
    if c.min_fidelity == 1.0 and lossy:
        line = _line_of(root, ("constraints", "min_fidelity"))
        raise ConfigError(
            f"{path}:{line}: constraints.min_fidelity: 1.0 demands outputs identical to the original, which the lossy "
            f"passes {lossy} cannot give; use e.g. 0.99"
        )


def with_value(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``config`` with the (possibly nested, dotted) field set to ``value``."""
    import copy

    out = copy.deepcopy(config)
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def _check_search(recipe: Recipe, path: Path, root: Any) -> None:
    """Every searched key names a step of the recipe and something it can vary: ``skip``, ``pass`` (alternative
    passes; every combination of them must connect, see :func:`_check_compositions`), or a config field of at least
    one of the step's passes — a field applies only to the passes that have it (e.g. ``smooth`` to
    quantize-dynamic when the pass is searched too)."""
    from slimship.passes import PASSES

    if recipe.search is None:
        return
    labels = recipe.step_labels()

    def where(key: str) -> str:
        return f"{path}:{_line_of(root, ('search', 'params', key))}: search.params.{key}"

    for key in recipe.search.params:
        label, dot, _ = key.partition(".")
        if not dot or label not in labels:
            raise ConfigError(
                f"{where(key)}: a searched parameter is '<step>.<config field>' (or '<step>.skip', "
                f"'<step>.pass') with a step of this recipe; steps: {labels}"
            )
    for key, param in recipe.search.params.items():
        label, _, field = key.partition(".")
        step = recipe.passes[labels.index(label)]
        if field == "skip":
            bad = [v for v in param.values_to_check() if not isinstance(v, bool)]
            if bad or param.choices is None:
                raise ConfigError(
                    f"{where(key)}: skip takes choices of true/false, got {param.choices or [param.low, param.high]}"
                )
        elif field == "pass":
            if param.choices is None:
                raise ConfigError(
                    f"{where(key)}: pass takes choices of pass names, e.g. [quantize-dynamic, quantize-static]"
                )
            for name in param.choices:
                alt = PASSES.get(str(name))
                if alt is None:
                    raise ConfigError(f"{where(key)}: unknown pass {name!r}; passes: {sorted(PASSES)}")
                try:
                    alt.config_cls.parse(step.config)
                except ConfigError as err:
                    raise ConfigError(
                        f"{where(key)}: step {label!r}'s config doesn't suit the alternative {name!r} "
                        f"(keep only fields every alternative has; search the others): {err}"
                    ) from err
    _check_compositions(recipe, path, root, where)
    for key, param in recipe.search.params.items():
        label, _, field = key.partition(".")
        if field in ("skip", "pass"):
            continue
        step = recipe.passes[labels.index(label)]
        names = step_pass_choices(recipe, label)
        top = field.split(".")[0]
        having = [n for n in names if top in PASSES[n].config_cls.model_fields]
        if not having:
            fields = sorted({f for n in names for f in PASSES[n].config_cls.model_fields})
            raise ConfigError(
                f"{where(key)}: {' / '.join(names)} has no config field {top!r}; fields: {fields} "
                "(or `skip`, `pass`)"
            )
        for name in having:
            for value in param.values_to_check():
                try:
                    PASSES[name].config_cls.parse(with_value(step.config, field, value))
                except ConfigError as err:
                    raise ConfigError(
                        f"{where(key)}: the value {value!r} is not valid for {name}: {err}"
                    ) from err


#: above this many combinations of searched ``pass``/``skip`` values, each key's choices are checked on their own
_MAX_COMPOSITIONS = 4096


def with_choices(recipe: Recipe, chosen: dict[str, Any]) -> list[Step]:
    """The recipe's steps with searched ``<step>.pass`` and ``<step>.skip`` values set (configs as written)."""
    labels = recipe.step_labels()
    steps = list(recipe.passes)
    for key, value in chosen.items():
        label, _, field = key.partition(".")
        i = labels.index(label)
        if field == "pass":
            steps[i] = steps[i].model_copy(update={"pass_name": str(value)})
        elif field == "skip":
            steps[i] = steps[i].model_copy(update={"skip": bool(value)})
    return steps


def _as_written(recipe: Recipe, key: str) -> Any:
    label, _, field = key.partition(".")
    step = recipe.passes[recipe.step_labels().index(label)]
    return step.pass_name if field == "pass" else step.skip


def _check_compositions(recipe: Recipe, path: Path, root: Any, where: Any) -> None:
    """Every combination of the searched ``pass`` and ``skip`` values makes a chain whose formats connect: a
    choice may change the format (ONNX Runtime or OpenVINO, say) only if every later step takes each format.
    The error names the combination that breaks, at the line of the searched key that introduced it."""
    import itertools
    import math

    assert recipe.search is not None
    keys = [k for k in recipe.search.params if k.partition(".")[2] in ("pass", "skip")]
    if not keys:
        return
    values = [list(recipe.search.params[k].choices or []) for k in keys]
    if math.prod(len(v) for v in values) <= _MAX_COMPOSITIONS:
        combos: Any = (dict(zip(keys, c, strict=True)) for c in itertools.product(*values))
    else:
        combos = ({k: v} for k, vs in zip(keys, values, strict=True) for v in vs)
    from slimship.passes import PASSES

    written = [s for s in recipe.passes if not s.skip] or recipe.passes
    start = PASSES[
        written[0].pass_name
    ].input_format  # the workload's format, as the recipe as written takes it
    for chosen in combos:
        try:
            _check_steps(
                recipe.model_copy(update={"passes": with_choices(recipe, chosen)}),
                path,
                root,
                searched=True,
                start=start,
            )
        except ConfigError as err:
            changed = {k: v for k, v in chosen.items() if v != _as_written(recipe, k)} or chosen
            shown = ", ".join(
                f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in changed.items()
            )
            raise ConfigError(
                f"{where(next(iter(changed)))}: with {shown} the steps don't connect: {err}. Every step after a "
                "searched choice must take each format the choices give (put a format-changing step such as "
                "convert-openvino last, or search only alternatives with the same input and output)"
            ) from err


def step_pass_choices(recipe: Recipe, label: str) -> list[str]:
    """The passes a step may run: its own, or the searched ``<step>.pass`` choices."""
    labels = recipe.step_labels()
    p = recipe.search.params.get(f"{label}.pass") if recipe.search else None
    return (
        [str(c) for c in p.choices]
        if p is not None and p.choices
        else [recipe.passes[labels.index(label)].pass_name]
    )


def effective_params(recipe: Recipe, params: dict[str, Any]) -> dict[str, Any]:
    """The searched values that change the candidate: a skipped step's fields and fields its chosen pass lacks
    are dropped, so two proposals that build the same candidate compare equal."""
    from slimship.passes import PASSES

    labels = recipe.step_labels()
    out: dict[str, Any] = {}
    for key, value in params.items():
        label, _, field = key.partition(".")
        step = recipe.passes[labels.index(label)]
        if field == "skip":
            out[key] = value
            continue
        if params.get(f"{label}.skip", step.skip):
            continue
        chosen = str(params.get(f"{label}.pass", step.pass_name))
        if field == "pass" or field.split(".")[0] in PASSES[chosen].config_cls.model_fields:
            out[key] = value
    return out


def _alternative_variants(passes: dict[str, Any], step_cls: Any) -> list[dict[str, Any]]:
    """Schemas of the fallbacks a step of ``step_cls`` may have: passes with the same input and output."""
    out = []
    for name, cls in passes.items():
        if (cls.input_format, cls.output_format) != (step_cls.input_format, step_cls.output_format):
            continue
        out.append(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["pass"],
                "properties": {
                    "pass": {"const": name, "description": cls.summary},
                    "label": {
                        "type": "string",
                        "pattern": r"^[A-Za-z0-9_.-]+$",
                        "description": StepAlternative.model_fields["label"].description,
                    },
                    "config": {
                        "$ref": f"#/$defs/config-{name}",
                        "description": f"config of the {name} pass ({cls.config_cls.__name__})",
                    },
                },
            }
        )
    return out


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of recipes with each pass's config schema, for editors (yaml-language-server)."""
    from slimship.passes import PASSES

    schema = Recipe.model_json_schema(by_alias=True)
    variants = []
    for name, cls in PASSES.items():
        variants.append(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["pass"],
                "properties": {
                    "pass": {"const": name, "description": cls.summary},
                    "name": {
                        "type": "string",
                        "pattern": r"^[A-Za-z0-9_.-]+$",
                        "description": Step.model_fields["name"].description,
                    },
                    "skip": {
                        "type": "boolean",
                        "default": False,
                        "description": Step.model_fields["skip"].description,
                    },
                    "config": {
                        **cls.config_cls.model_json_schema(),
                        "description": f"config of the {name} pass ({cls.config_cls.__name__})",
                    },
                    "fallbacks": {
                        "type": "array",
                        "items": {"oneOf": _alternative_variants(PASSES, cls)},
                        "description": Step.model_fields["fallbacks"].description,
                    },
                },
            }
        )
    schema["properties"]["passes"] = {
        "type": "array",
        "minItems": 1,
        "items": {"oneOf": variants},
        "description": Recipe.model_fields["passes"].description,
    }
    defs = schema.setdefault("$defs", {})
    defs.pop("Step", None)
    defs.pop("StepAlternative", None)
    for name, cls in PASSES.items():
        defs[f"config-{name}"] = cls.config_cls.model_json_schema()
    schema["title"] = "slimship recipe"
    return schema
