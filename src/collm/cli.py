"""The `collm` command line: one command per pipeline stage, `--help` on each explains every option."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape as rich_escape

from collm.backends.models import check_device
from collm.errors import CollmError
from collm.pair import PairSpec

app = typer.Typer(
    help="Collaborative decoding: a cheap base model writes, and defers single tokens to an expert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

EXAMPLE_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def load_config(ctx: typer.Context, param, value: Optional[Path]):
    """`--config FILE`: a JSON (or YAML) object of option defaults; options given on the line still win.

    A key that names no option of the command is refused with the closest one (a misspelt `thresold`
    would otherwise be ignored and the run made with the default)."""
    if value is None:
        return value
    if not value.is_file():
        raise CollmError(f"config file {str(value)!r} does not exist")
    try:
        text = value.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CollmError(f"config file {value} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    try:
        data = json.loads(text) if value.suffix == ".json" else _yaml(text)
    except ValueError as e:
        raise CollmError(f"config file {value} is not valid: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CollmError(f"config file {value} must hold an object of option names to values")
    options = {p.name for p in ctx.command.params if p.name != "config"}
    for key in data:
        if str(key).replace("-", "_") not in options:
            guess = _closest(str(key).replace("-", "_"), options)
            hint = f"did you mean {guess!r}?" if guess else f"see `collm {ctx.info_name} --help` for its options"
            raise CollmError(f"config file {value}: {key!r} is not an option of collm {ctx.info_name}; {hint}")
    ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in data.items()}}
    return value


def _closest(word: str, choices: set[str]) -> str | None:
    """The option a misspelt key most likely meant, or None where none is close."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="JSON or YAML file of option values (options on the line override it).",
                 callback=load_config, is_eager=True),
]


@dataclasses.dataclass
class GenerateConfig:
    """What `collm generate` writes (which models: PairSpec)."""

    prompts: list[str] = dataclasses.field(default_factory=list, metadata={"argument": True})
    """Prompts; several run as one batch."""
    prompt_file: str | None = None
    """Read prompts from a file, one per line."""
    threshold: float | None = None
    """Defer where P(expert) exceeds this, in [0, 1]. Default: the run's, else 0.5."""
    mode: str = "collm"
    """collm (route by the head), compose (sample the mixture), base or expert (one model alone)."""
    max_new_tokens: int = 256
    """Most new tokens per prompt."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    seed: int = 0
    """Sampling seed: same seed, same tokens."""
    stop: list[str] = dataclasses.field(default_factory=list)
    """Stop string (repeatable); the text ends before it."""
    raw: bool = False
    """Send prompts as raw text, without the base's chat template."""
    compile: bool = False
    """CUDA: torch.compile the static-cache steps (slow first call, faster after)."""
    lookahead: int = 1
    """Draft past deferrals: the base writes on up to this many tokens and the expert checks them in one read
    (Co-LLM's tokens, fewer expert calls). With --mode expert: speculative decoding. 1: no drafting."""
    rewind: float = 0.0
    """Backtracking: the expert re-writes a base token it gives a probability below this (0: off)."""
    yield_below: float = 0.0
    """Backtracking: the base's token stands where the expert's own is less probable than this (0: off)."""
    max_rewinds: int = 8
    """Most rewinds per answer."""
    as_json: bool = dataclasses.field(default=False, metadata={"flag": "--json"})
    """Print one JSON object instead of colored text."""


def _generate(config, spec) -> None:
    """Answer prompts with a base and expert(s); each token is colored by the model that wrote it."""
    from collm.core.request import make_request

    c = config
    texts = _read_prompts(c.prompts, c.prompt_file) or [EXAMPLE_QUESTION]
    options = dict(max_new_tokens=c.max_new_tokens, threshold=c.threshold, mode=c.mode, stop=c.stop,
                   do_sample=c.do_sample, temperature=c.temperature, top_p=c.top_p, seed=c.seed,
                   lookahead=c.lookahead, rewind=c.rewind, yield_below=c.yield_below, max_rewinds=c.max_rewinds)
    make_request(**options)  # checked before minutes of loading, not after
    check_device(spec.device)
    if c.mode == "collm":
        _zero_head_note(spec, c.threshold)
    pair = _load_pair(spec)
    stream = None
    if not c.as_json and len(texts) == 1 and not c.stop:  # one answer, no text to trim: show it as it is written
        from collm.decoding.provenance import Stream, legend

        console.print(legend(_expert_names(pair)))
        console.rule(style="dim")
        console.print(f"[dim]> {texts[0]}[/dim]")
        stream = Stream(console, pair.tokenizer)
    out = pair.generate(texts, chat=not c.raw, compile=c.compile, on_token=stream, **options)
    if stream is not None:
        console.print()
        _print_summary(out.stats)
        return
    if c.as_json:
        print(json.dumps({"prompts": texts, "texts": out.texts, "token_ids": out.token_ids, "sources": out.sources,
                          "defer_probs": out.defer_probs, "stopped_by": out.stopped_by, "stats": out.stats}))
        return
    _print_answers(pair, texts, out)


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (Python keeps none at run time: read the source)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.replace("``", "").split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)}


def _zero_head_note(spec, threshold) -> None:
    """Say (once, before loading) that models given without a head never defer at the default threshold; the
    pair's own warning at the first request is then silenced."""
    if spec.names_models and spec.run is None and spec.head is None and len(spec.expert or [None]) == 1 \
            and (0.5 if threshold is None else threshold) >= 0.5:
        err.print(f"[yellow]note:[/yellow] no --head: the zero head gives P(defer) = 0.5, which never exceeds "
                  f"threshold {0.5 if threshold is None else threshold:g}, so the expert writes nothing; train a "
                  f"head (collm train), or pass --threshold below 0.5 or --head always", highlight=False, soft_wrap=True)
    warnings.filterwarnings("ignore", message="no head was given")  # said above, or not the case


def _load_pair(spec):
    """The pair a PairSpec names; with no model option, the shipped SmolLM2 run (and a line saying so)."""
    from collm.run import DEFAULT_RUN

    if not spec.names_models:
        err.print(f"[dim]no model options: the shipped {DEFAULT_RUN} run (tuned base, math expert, trained head); "
                  f"--run, --base/--expert/--head choose others[/dim]", highlight=False)
    with err.status("loading models"):
        return spec.load()


def _serve(spec, config) -> None:
    """`collm serve`: load the pair (once its settings are checked), then serve it until Ctrl-C."""
    import uvicorn

    from collm.serve.app import build_app
    from collm.serve.serving import LOOPBACK, WILDCARD

    _zero_head_note(spec, config.threshold)
    pair = _load_pair(spec)
    err.print(f"[dim]serving {config.model_name!r} on http://{config.host}:{config.port} (playground at /)[/dim]")
    if config.host not in (*LOOPBACK, "::1") and config.api_key is None:
        err.print(f"[yellow]note:[/yellow] listening on {config.host} with no --api-key: anyone who can reach this "
                  f"port can use the models", highlight=False)
    if config.host in WILDCARD and "*" not in config.allowed_hosts:
        err.print(f"[dim]answering requests for {', '.join(config.served_hosts)}; add the names clients use with "
                  f"--allowed-host[/dim]", highlight=False)
    # open streams get 5 s to finish on Ctrl-C; then their rows are dropped with the engine
    uvicorn.run(build_app(pair, config), host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=5)


def _read_prompts(prompts: Optional[list[str]], prompt_file: Optional[Path]) -> list[str]:
    """Prompts from the line and the file, each checked before any model loads: UTF-8 and not empty."""
    texts = list(prompts or [])
    for number, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8")  # undecodable argv bytes arrive as lone surrogates
        except UnicodeEncodeError:
            raise CollmError(f"prompt {number} is not valid UTF-8 text: set a UTF-8 locale, or use --prompt-file "
                             f"with a UTF-8 file") from None
        if not text.strip():
            raise CollmError(f"prompt {number} is empty: give a question")
    if prompt_file is not None:
        from collm.data.rows import read_text

        text = read_text(prompt_file, "prompt file")
        texts += [line for line in text.splitlines() if line.strip()]
    return texts


def _print_answers(pair, prompts: list[str], out) -> None:
    from collm.decoding.provenance import colored, legend

    console.print(legend(_expert_names(pair)))
    for prompt, ids, sources in zip(prompts, out.token_ids, out.sources):
        console.rule(style="dim")
        console.print(f"[dim]> {prompt}[/dim]")
        console.print(colored(pair.tokenizer, ids, sources))
    _print_summary(out.stats)


def _expert_names(pair) -> list[str]:
    return [str(n) for n in pair.info.get("experts", [])] or [f"{k}" for k in range(1, len(pair.experts) + 1)]


def _print_summary(stats: dict) -> None:
    console.rule(style="dim")
    console.print(
        f"[dim]{stats['new_tokens']} new tokens, deferral rate {stats['defer_rate']:.1%}, "
        f"{stats['expert_calls']} expert calls, {stats['tokens_per_s']:.1f} tokens/s[/dim]"
    )


def _demo(config) -> None:
    """The embedded default, offline: SmolLM2-135M-Instruct with a shipped math expert (LoRA) and a trained
    deferral head answer held-out GSM8K problems (base alone, expert alone, Co-LLM), then the measured table."""
    from collm import demo as d

    d.run(console, folder=d.PAIRS[config.pair], count=config.count, max_new_tokens=config.max_new_tokens,
          device=config.device, threshold=config.threshold, lookahead=config.lookahead, rewind=config.rewind)


def _bench(config, output) -> None:
    from collm.evaluation import bench as b

    rows = b.run(config, progress=lambda r: err.print(f"[dim]{r.system} f={r.f:g} batch={r.batch}: "
                                                      f"{r.ms_per_token:.2f} ms/token[/dim]"))
    b.save(rows, config, output.json_out, output.markdown_out, output.png)
    print(b.markdown(rows))


data_app = typer.Typer(help="Make prompt/completion JSONL data sets (GSM8K variants, arithmetic, facts).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@dataclasses.dataclass
class DataOut:
    """Where a `collm data` command writes."""

    out: str
    """Output folder for the JSONL splits and manifest.json (created; the same seed gives the same files)."""


def _data_gsm(out, config) -> None:
    from collm.data import gsm

    manifest = gsm.write_dataset(Path(out.out), config)
    for template_id, reason in manifest["skipped"].items():
        err.print(f"[yellow]skipped[/yellow] {reason}", highlight=False)
    print(json.dumps({"rows": manifest["rows"], "skipped": len(manifest["skipped"])}))


def _data_arithmetic(out, config) -> None:
    from collm.data import arithmetic

    print(json.dumps({"rows": arithmetic.write_dataset(Path(out.out), config)["rows"]}))


def _data_facts(out, config) -> None:
    from collm.data import facts

    manifest = facts.write_dataset(Path(out.out), config)
    print(json.dumps({key: manifest[key] for key in ("rows", "entities", "facts", "guess_rate", "changed_facts")}))


def _data_calc(out, config) -> None:
    from collm.training import expert

    print(json.dumps({"rows": expert.write_calc_dataset(Path(out.out), config)["rows"]}))


def _floats(text: str) -> tuple[float, ...]:
    """"0.3, 0.5" -> (0.3, 0.5); CollmError naming the text where a part is not a number."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CollmError(f"expected comma-separated numbers, got {text!r}") from None


PARSERS = {"floats": _floats, "ints": lambda text: tuple(int(x) for x in _floats(text)),
           "names": lambda text: tuple(x.strip() for x in text.split(",") if x.strip())}
"""Text forms a config field may take on the command line (its metadata's "parse")."""


def dataclass_command(classes, name: str, run, *, short_help: str, on: typer.Typer | None = None) -> None:
    """Register command ``name`` whose options are the fields of the dataclass ``classes`` (one, or a tuple of
    several with distinct field names), each with its type, its default and, as help, the docstring under the
    field: the config class is the one place an option is described. A field's metadata may name its ``flag``
    (default --field-name) and an ``envvar``. ``run(config)`` (one class) or ``run(*configs)`` does the work;
    ``--config FILE`` supplies values too."""
    classes = classes if isinstance(classes, tuple) else (classes,)
    params, owner, parse = [], {}, {}
    for cls in classes:
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise ValueError(f"{cls.__name__}.{f.name} is also a field of {owner[f.name].__name__}")
            owner[f.name] = cls
            if "parse" in f.metadata:
                parse[f.name] = PARSERS[f.metadata["parse"]]
            params.append(_option(f, hints[f.name], docs.get(f.name, "")))
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=ConfigOption))

    def command(**values):
        values.pop("config", None)
        for name, text_form in parse.items():  # a field with a text form on the command line ("0.3,0.5")
            if isinstance(values.get(name), str):
                values[name] = text_form(values[name])
        configs = [cls(**{k: v for k, v in values.items() if owner[k] is cls
                          and (v is not None or k not in _list_fields(cls))}) for cls in classes]
        run(*configs)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = short_help
    command.__name__ = name
    (on or app).command(name)(command)


def _option(f: dataclasses.Field, hint, doc: str) -> inspect.Parameter:
    """The typer option of one dataclass field."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # `int | None`: an optional int
        hint = typing.Optional[next(a for a in typing.get_args(hint) if a is not type(None))]
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = ... if required else (f.default_factory() if f.default is dataclasses.MISSING else f.default)
    if default == []:
        default = None
    if "parse" in f.metadata:  # typed as text on the command line: comma-separated numbers or names
        hint, default = str, ",".join(x if isinstance(x, str) else f"{x:g}" for x in default)
    flags = (f.metadata["flag"],) if "flag" in f.metadata else ()
    if f.metadata.get("argument"):
        option = typer.Argument(help=rich_escape(doc), show_default=False)
    else:
        option = typer.Option(*flags, help=rich_escape(doc), show_default=not required,
                              envvar=f.metadata.get("envvar"))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[hint, option])


def _list_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}


def _train(config) -> None:
    from collm.training import train as tr

    print(tr.train(config))


def _reward(config) -> None:
    from collm.training.reward import train_reward

    print(train_reward(config, progress=lambda line: err.print(f"[dim]{line}[/dim]", highlight=False)))


def _score(config) -> None:
    from collm.training import score as sc

    sc.score(config)


def _eval(target, config) -> None:
    from collm.evaluation import evaluate as ev

    results = ev.evaluate_run(target.run, target.data, config, weak_run=target.weak_run, sft_run=target.sft_run,
                              json_path=target.json_out, markdown_path=target.markdown, html_path=target.html,
                              device=target.device, dtype=target.dtype)
    print(ev.markdown_table(results))


def _calibrate(target, config) -> None:
    from collm.evaluation import calibrate as cal

    record = cal.calibrate_run(target.run, target.data, config, target.png, target.device, target.dtype,
                               progress=lambda t, p: err.print(f"[dim]threshold {t:g}: accuracy {p.accuracy:.3f}, "
                                                               f"deferral rate {p.defer_rate:.3f}[/dim]"))
    print(json.dumps({"threshold": record["chosen"]["threshold"], "chosen": record["chosen"]}))


def _register_commands() -> None:
    """The commands whose options are the fields of config dataclasses (all but seal)."""
    from collm.data.arithmetic import ArithmeticConfig
    from collm.data.facts import FactsConfig
    from collm.data.gsm import GsmConfig
    from collm.demo.command import DemoConfig
    from collm.evaluation.bench import BenchConfig, BenchOutput
    from collm.evaluation.calibrate import CalibrateConfig, CalibrateRun
    from collm.evaluation.evaluate import EvalConfig, EvalRun
    from collm.serve.serving import ServeConfig
    from collm.training.expert import CalcConfig
    from collm.training.reward import RewardConfig
    from collm.training.score import ScoreConfig
    from collm.training.train import TrainConfig

    dataclass_command((GenerateConfig, PairSpec), "generate", _generate,
                      short_help="Answer prompts with a base and expert(s); each token is colored by the model that "
                                 "wrote it.")
    dataclass_command((PairSpec, ServeConfig), "serve", _serve,
                      short_help="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                                 "/health) whose every token carries who wrote it, with a playground page at /.")
    dataclass_command(DemoConfig, "demo", _demo,
                      short_help="The shipped run, offline: base alone, expert alone and Co-LLM answer held-out "
                                 "GSM8K problems, each token colored by its writer, then the measured table.")
    dataclass_command(ScoreConfig, "score", _score,
                      short_help="Run the expert once over the data: per completion token, log P(gold) and whether "
                                 "its argmax is gold (resumable, sharded).")
    dataclass_command(TrainConfig, "train", _train,
                      short_help="Train the deferral head (and base) by marginal likelihood; runs under "
                                 "`accelerate launch` too.")
    dataclass_command(RewardConfig, "reward", _reward,
                      short_help="Train the head on whole answers: rollouts with sampled writers, a reward "
                                 "(correct minus a price per expert token), policy gradient; resumable.")
    dataclass_command((CalibrateRun, CalibrateConfig), "calibrate", _calibrate,
                      short_help="Pick the threshold with the best validation accuracy (within --max-defer) and "
                                 "save it in the run.")
    dataclass_command((EvalRun, EvalConfig), "eval", _eval,
                      short_help="Exact-match accuracy of base, expert, Co-LLM and random deferral (and given "
                                 "runs), with 95% intervals.")
    dataclass_command((BenchConfig, BenchOutput), "bench", _bench,
                      short_help="Time ms/token (decoding, after the first token; prefill apart) for base, expert, "
                                 "Co-LLM at deferral fractions f, a naive re-encoding loop and transformers.")
    dataclass_command((DataOut, GsmConfig), "gsm", _data_gsm, on=data_app,
                      short_help="GSM8K problems and checked new variants from the GSM-Symbolic templates, split "
                                 "by template.")
    dataclass_command((DataOut, ArithmeticConfig), "arithmetic", _data_arithmetic, on=data_app,
                      short_help="Arithmetic problems from mathematics_dataset; no question appears in two splits.")
    dataclass_command((DataOut, FactsConfig), "facts", _data_facts, on=data_app,
                      short_help="A knowledge-update benchmark: fictional entities and their facts, documents to "
                                 "teach them, a recall probe, and word problems over them split by template.")
    dataclass_command((DataOut, CalcConfig), "calc", _data_calc, on=data_app,
                      short_help="Training rows for the math expert: calculations written as GSM8K notes, plus "
                                 "arithmetic (no word problems).")


_register_commands()




@app.command()
def seal(
    run: Annotated[Path, typer.Argument(help="Run folder to record as it is now.")],
):
    """Record a run's files as they are now (sha256 in manifest.json): for runs saved before manifests, or
    files you changed on purpose. Every load checks the manifest."""
    from collm.run import seal as seal_run

    manifest = seal_run(run)
    print(json.dumps({"files": len(manifest["files"]), "total_bytes": manifest["total_bytes"]}))


def main() -> None:
    """Entry point: a CollmError becomes one line on stderr and exit status 2, not a traceback."""
    from collm.atomic import is_disk_full

    try:
        app()
    except CollmError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:  # a write that no collm writer wraps
        if not is_disk_full(e):
            raise
        err.print(f"[red]error:[/red] no space left on the device{f' while writing {e.filename}' if e.filename else ''}:"
                  f" free some space, then run the same command again", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
