"""The command line: parse, call one library function, print. Nothing else.

Imports of torch and transformers happen inside the commands, so `peftcli --help` is instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="peftcli",
    help="Fine-tune Hugging Face models with parameter-efficient methods, driven by YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err_console = Console(stderr=True)
out_console = Console()

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    from rich.markup import escape

    # escape: messages carry brackets ("pip install 'peftcli[wandb]'", "train.loggers[0]") that rich would eat
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


def guarded(func):
    """Turn user mistakes (RecipeError) into one red line and exit code 2, never a traceback."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from peftcli.recipe import RecipeError

        try:
            return func(*args, **kwargs)
        except RecipeError as err:
            fail(str(err))
        except MemoryError as err:  # faults.OutOfMemory is one: CUDA OOM with advice for this run
            exit_code = getattr(err, "exit_code", 1)
            err_console.print(f"[bold red]out of memory:[/bold red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@guarded
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
    overrides: Annotated[
        Optional[list[str]], typer.Argument(help="key.path=value overrides, e.g. train.lr=1e-4")
    ] = None,
    output_dir: Annotated[
        Optional[str], typer.Option("--output-dir", "-o", help="run directory (overrides output_dir)")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the newest complete checkpoint")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="discard the earlier run in the output directory first")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar or tables")] = False,
    allow_code: Annotated[
        bool,
        typer.Option(
            "--allow-code", help="run the recipe's Python reward functions (grpo's rewards: python)"
        ),
    ] = False,
    nproc_per_node: Annotated[
        Optional[int],
        typer.Option("--nproc-per-node", help="start this many processes through torchrun (one per GPU)"),
    ] = None,
    nnodes: Annotated[int, typer.Option("--nnodes", help="machines in the job (with --nproc-per-node)")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="this machine's index, 0..nnodes-1")] = 0,
    master_addr: Annotated[Optional[str], typer.Option("--master-addr", help="node 0's address")] = None,
    master_port: Annotated[Optional[int], typer.Option("--master-port", help="node 0's free port")] = None,
    rdzv_endpoint: Annotated[
        Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT rendezvous instead of a master")
    ] = None,
    rdzv_id: Annotated[Optional[str], typer.Option("--rdzv-id", help="job id for --rdzv-endpoint")] = None,
) -> None:
    """Fine-tune a model as a recipe says; write the run directory (adapter, metrics, checkpoints).
    With --nproc-per-node N, train on N processes (DDP or FSDP, see docs/distributed.md)."""
    from peftcli.training import distributed

    if nproc_per_node is not None:
        options = distributed.LaunchOptions(
            nproc_per_node, nnodes, node_rank, master_addr, master_port, rdzv_endpoint, rdzv_id
        )
        raise typer.Exit(distributed.launch(options, distributed.worker_args(sys.argv[1:])))
    from peftcli.recipe_loader import load_recipe
    from peftcli.training.console import Reporter
    from peftcli.training.loop import TrainingInterrupted
    from peftcli.training.loop import train as run

    loaded = load_recipe(recipe, overrides or [], output_dir)
    reporter = Reporter(err_console, quiet=quiet)
    try:
        result = run(loaded, resume=resume, reporter=reporter, overwrite=overwrite, allow_code=allow_code)
    except TrainingInterrupted as stop:
        if distributed.is_main_process():
            err_console.print(
                f"[yellow]stopped at step {stop.step}[/yellow]; checkpoint written to {stop.checkpoint}. "
                f"Continue with: peftcli train {recipe} --resume"
                + (f" --output-dir {output_dir}" if output_dir else "")
            )
        raise typer.Exit(130 if stop.signum == 2 else 143) from None
    if not distributed.is_main_process():
        return
    if not quiet:
        err_console.print(reporter.result_table(result))
    out_console.print(f"adapter written to {result.adapter_dir}", highlight=False)


# merge and eval: the one way a command-line user asks for pickle weights by name
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="load .bin (pickle) weights when the base has no safetensors; pickle can run code",
    ),
]


@app.command()
@guarded
def merge(
    adapter_dir: Annotated[Path, typer.Argument(help="adapter directory (RUN/adapter)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="directory for the merged model")],
    base: Annotated[
        Optional[str], typer.Option(help="base model (default: the one the adapter names)")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    dequantize: Annotated[
        bool,
        typer.Option(
            "--dequantize",
            help="QLoRA: merge into the dequantized 4-bit base the adapter was trained on, not the original "
            "weights (docs/merging.md)",
        ),
    ] = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Fold an adapter into its base and write a plain transformers model directory."""
    from peftcli.recipe import RecipeError, did_you_mean

    if dtype not in ("float32", "bfloat16", "float16"):
        raise RecipeError(
            "--dtype",
            f"{dtype!r} is not a dtype",
            did_you_mean(dtype, ["float32", "bfloat16", "float16"]) or "use float32, bfloat16 or float16",
        )
    from peftcli.api import merge as run

    info = run(adapter_dir, output, base=base, dtype=dtype, dequantize=dequantize, allow_pickle=allow_pickle)
    for line in info.get("report_lines", []):
        err_console.print(line, highlight=False)
    out_console.print(
        f"merged {info['method']} into {info['base']} ({dtype}) -> {info['output']}", highlight=False
    )


@app.command()
@guarded
def combine(
    adapters: Annotated[list[Path], typer.Argument(help="LoRA adapter directories of one base model")],
    output: Annotated[Path, typer.Option("--output", "-o", help="directory for the combined adapter")],
    weights: Annotated[
        Optional[str], typer.Option(help="one weight per adapter, comma-separated, e.g. 0.7,0.3")
    ] = None,
    how: Annotated[
        Optional[str],
        typer.Option(help="linear | cat | svd | ties | dare_linear | dare_ties | magnitude_prune"),
    ] = None,
    density: Annotated[
        Optional[float],
        typer.Option(help="ties, dare_*, magnitude_prune: the fraction of entries kept, e.g. 0.5"),
    ] = None,
    seed: Annotated[int, typer.Option(help="dare_*: the seed of the random drops")] = 0,
    rank: Annotated[
        Optional[int], typer.Option(help="svd: the result's rank (default: the largest input's)")
    ] = None,
    majority_sign: Annotated[
        str,
        typer.Option("--majority-sign", help="ties, dare_ties: elect signs by total (values) or frequency"),
    ] = "total",
) -> None:
    """Combine LoRA adapters of one base into one LoRA adapter, as peft's add_weighted_adapter
    (docs/merging.md)."""
    from peftcli.combining import HOWS, parse_weights
    from peftcli.recipe import RecipeError, did_you_mean

    if how is None or how not in HOWS:
        hint = (did_you_mean(how, HOWS) if how else None) or f"use one of {', '.join(HOWS)}"
        raise RecipeError("--how", "is required" if how is None else f"{how!r} is not a way to combine", hint)
    from peftcli.api import combine as run

    result = run(
        adapters, output, parse_weights(weights, len(adapters)), how, density, seed, rank, majority_sign
    )
    out_console.print(
        f"combined {len(adapters)} adapters ({how}, rank {result['rank']}, {result['modules']} modules) "
        f"-> {result['output']}",
        highlight=False,
    )


@app.command()
@guarded
def export(
    target: Annotated[
        str, typer.Argument(help="adapter directory (RUN/adapter), model directory or model name")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="gguf | gguf-lora | ollama")] = "gguf",
    output: Annotated[
        Path, typer.Option("--output", "-o", help="the .gguf file (gguf, gguf-lora) or a directory (ollama)")
    ] = ...,
    quant: Annotated[
        Optional[str],
        typer.Option(
            help="f32 | f16 | bf16 | q8_0 (default: f16 for gguf, q8_0 for ollama, f32 for gguf-lora)"
        ),
    ] = None,
    base: Annotated[
        Optional[str], typer.Option(help="base model (default: the one the adapter names)")
    ] = None,
    system: Annotated[Optional[str], typer.Option(help="ollama: the Modelfile's SYSTEM prompt")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Write a model or adapter for llama.cpp / Ollama: merged GGUF, LoRA-only GGUF, or an Ollama directory."""
    from peftcli.api import export as run

    _check_export_options(format, system)
    with _writing_progress(enabled=not as_json) as show:
        result = run(target, output, format, quant=quant, base=base, system=system, progress=show)
    if as_json:
        print(json.dumps(result))
        return
    for note in result.get("notes", []):
        err_console.print(f"[dim]{note}[/dim]", highlight=False)
    what = f"{result['format']} ({result['quant']}, {result['arch']}, {result['bytes'] / 2**20:.1f} MiB)"
    out_console.print(f"{what} -> {result['output']}", highlight=False)
    if result["format"] == "ollama":
        out_console.print(f"import it: ollama create NAME -f {result['modelfile']}", highlight=False)


def _check_export_options(format: str, system: str | None) -> None:
    from peftcli.recipe import RecipeError, did_you_mean

    formats = ("gguf", "gguf-lora", "ollama")
    if format not in formats:
        raise RecipeError(
            "--format",
            f"{format!r} is not a format",
            did_you_mean(format, formats) or "use gguf, gguf-lora or ollama",
        )
    if system is not None and format != "ollama":
        raise RecipeError("--system", "only the ollama format has a system prompt", "drop --system")


@contextlib.contextmanager
def _writing_progress(enabled: bool):
    """A progress callback ``(done, total, what)`` drawing a bar on stderr (None when not ``enabled``).
    The bar starts with the first tensor, so a refusal before it prints one line only."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("writing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        console=err_console, transient=True,
    )  # fmt: skip
    tasks: list = []

    def show(done: int, total: int, what: str) -> None:
        if not tasks:
            bar.start()
            tasks.append(bar.add_task("", total=total))
        bar.update(tasks[0], completed=done, description=what)

    try:
        yield show if enabled else None
    finally:
        if tasks:
            bar.stop()


@app.command("eval")
@guarded
def eval_(
    target: Annotated[Path, typer.Argument(help="a recipe, an adapter directory or a model directory")],
    data: Annotated[
        Optional[str], typer.Option(help="eval data file (default: the recipe's eval data)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    max_examples: Annotated[Optional[int], typer.Option(help="evaluate at most this many examples")] = None,
    ensemble: Annotated[
        Optional[list[str]],
        typer.Option(
            "--ensemble",
            help="another adapter over the same base (repeatable): evaluate them with the target as one",
        ),
    ] = None,
    vote: Annotated[
        bool, typer.Option("--vote", help="ensemble by majority vote instead of averaged logits (seq_cls)")
    ] = False,
    allow_pickle: AllowPickle = False,
    tasks: Annotated[
        Optional[str],
        typer.Option(help="lm-evaluation-harness tasks instead, e.g. hellaswag,arc_easy (peftcli[eval])"),
    ] = None,
    include_path: Annotated[
        Optional[str], typer.Option("--include-path", help="with --tasks: a directory of task YAML files")
    ] = None,
    num_fewshot: Annotated[
        Optional[int], typer.Option("--num-fewshot", help="with --tasks: examples in each prompt")
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option(help="with --tasks: score at most this many documents per task")
    ] = None,
    allow_task_code: Annotated[
        bool,
        typer.Option("--allow-task-code", help="with --tasks: let task YAML run its !function Python"),
    ] = False,
) -> None:
    """Measure eval loss, perplexity and accuracy / exact match of a base, adapter or merged model,
    or with --tasks score it on lm-evaluation-harness tasks (docs/use.md)."""
    if tasks is not None:
        mixed = bool(data or max_examples or ensemble or vote)
        _eval_tasks(target, tasks, include_path, num_fewshot, limit, allow_task_code, as_json, mixed)
        return
    from peftcli.api import evaluate_target

    result = evaluate_target(
        target,
        data=data,
        max_examples=max_examples,
        ensemble=ensemble,
        vote=vote,
        allow_pickle=allow_pickle,
        log=None if as_json else lambda line: err_console.print(f"[dim]{line}[/dim]", highlight=False),
    )
    _print_eval(result, as_json)


def _eval_tasks(
    target: Path,
    tasks: str,
    include_path: str | None,
    num_fewshot: int | None,
    limit: int | None,
    allow_task_code: bool,
    as_json: bool,
    mixed: bool,
) -> None:
    """eval --tasks: lm-eval's tasks on the target, printed as a table or one JSON object. ``mixed``: options
    of the other eval were given too, which is refused."""
    from peftcli.recipe import RecipeError

    if mixed:
        raise RecipeError(
            "--tasks",
            "runs lm-eval tasks; --data, --max-examples, --ensemble and --vote do not apply",
            "run them as two commands",
        )
    from peftcli.api import evaluate_tasks
    from peftcli.training.console import task_table

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    result = evaluate_tasks(target, names, include_path, num_fewshot, limit, allow_task_code)
    if as_json:
        print(json.dumps(result))
    else:
        out_console.print(task_table(result))


def _print_eval(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    from rich.table import Table

    table = Table(title=f"eval {result['target']} ({result['kind']})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key not in ("target", "kind"):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out_console.print(table)


@app.command()
@guarded
def generate(
    target: Annotated[str, typer.Argument(metavar="MODEL_OR_ADAPTER", help="adapter or model directory")],
    input: Annotated[
        Path, typer.Option("--input", "-i", help='JSON lines: {"prompt": ...} or {"messages": [...]}')
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="JSON lines out; a rerun continues after its rows")
    ],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens per completion")] = 128,
    temperature: Annotated[float, typer.Option(help="0: greedy; else sample at this temperature")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="sampling: nucleus probability mass")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="rows decoded together")] = 8,
    seed: Annotated[int, typer.Option(help="sampling seed (same seed, same output)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
) -> None:
    """Complete every row of a JSON-lines file with a model or adapter (batched, resumable)."""
    from peftcli.api import generate as run
    from peftcli.use.generate import GenerateOptions

    options = GenerateOptions(max_new_tokens, temperature, top_p, batch_size, seed)
    summary = run(
        target,
        input,
        output,
        options,
        console=None if as_json else err_console,
        log=lambda line: err_console.print(f"[dim]{line}[/dim]", highlight=False),
    )
    if as_json:
        print(json.dumps(summary))
        return
    out_console.print(
        f"{summary['rows']} rows in {summary['output']}: {summary['generated']} generated now "
        f"({summary['completion_tokens']} tokens, {summary['seconds']:.1f} s), "
        f"{summary['already_written']} already there",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@guarded
def chat(
    target: Annotated[str, typer.Argument(metavar="MODEL_OR_ADAPTER", help="adapter or model directory")],
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens per reply")] = 256,
    temperature: Annotated[float, typer.Option(help="0: greedy; else sample at this temperature")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="sampling: nucleus probability mass")] = 1.0,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
) -> None:
    """Talk to a model or adapter through its chat template (/reset, /system TEXT, /exit).
    Piped stdin is answered one turn per line."""
    from peftcli.api import chat as run
    from peftcli.use.chat import COMMANDS
    from peftcli.use.generate import GenerateOptions

    interactive = sys.stdin.isatty()

    def lines():
        if not interactive:
            yield from sys.stdin
            return
        err_console.print(f"[dim]commands: {COMMANDS}; Ctrl-D ends[/dim]", highlight=False)
        while True:
            try:
                yield err_console.input("[bold green]you>[/bold green] ")
            except EOFError:
                return

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run(
        target,
        lines(),
        write,
        note=lambda text: err_console.print(f"[dim]{text}[/dim]", highlight=False),
        system=system,
        options=GenerateOptions(max_new_tokens, temperature, top_p, 1, seed),
    )


@app.command()
@guarded
def validate(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides")] = None,
    show: Annotated[bool, typer.Option("--show", help="print the resolved recipe")] = False,
) -> None:
    """Check a recipe (keys, types, ranges, method options, local files) without loading weights."""
    from peftcli.recipe import dump_recipe
    from peftcli.recipe_loader import load_recipe, validate_files

    loaded = load_recipe(recipe, overrides or [])
    validate_files(loaded)
    from peftcli.api import validate_data

    data_lines = validate_data(loaded)  # the first rows of every source through the format code
    if show:
        out_console.print(dump_recipe(loaded), highlight=False)
    out_console.print(
        f"[green]ok[/green] {recipe}: {loaded.method.name} on {loaded.model.name} "
        f"({loaded.model.task}), output_dir {loaded.output_dir}",
        highlight=False,
    )
    for line in data_lines:
        err_console.print(f"[dim]{line}[/dim]", highlight=False)


@app.command()
@guarded
def preprocess(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Tokenize and cache a recipe's data ahead of training (e.g. on a CPU box) and describe it."""
    from peftcli.api import preprocess as run
    from peftcli.recipe_loader import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    summary = run(
        loaded,
        log=lambda line: err_console.print(f"[dim]{line}[/dim]", highlight=False),
        console=err_console,
    )
    if as_json:
        print(json.dumps(summary))
        return
    from rich.table import Table

    table = Table(title=f"preprocess {recipe}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("examples", f"{summary['examples']} train, {summary['eval_examples']} eval")
    table.add_row("tokens", f"{summary['tokens']} ({summary['trained_tokens']} trained)")
    table.add_row(
        "length",
        f"p50 {summary['length_p50']}, p90 {summary['length_p90']}, p99 {summary['length_p99']}, "
        f"max {summary['length_max']} (max_length {summary['max_length']})",
    )
    table.add_row("truncated", str(summary["truncated"]))
    table.add_row("dropped", f"{summary['dropped']} (no answer token left after truncation)")
    if summary["skipped"]:
        table.add_row("skipped", ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()))
    table.add_row(
        "padding",
        f"{100 * summary['padding_fraction']:.1f}% of a padded batch of {summary['batch_size']}",
    )
    if len(summary["sources"]) > 1:
        for source in summary["sources"]:
            table.add_row(
                "source",
                f"{source['source']} ({source['format']}): {source['rows']} rows, "
                f"{100 * source['token_share']:.1f}% of the tokens",
            )
    table.add_row("time", f"{summary['seconds']:.1f} s")
    out_console.print(table)


@app.command()
@guarded
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="run directory (a recipe's output_dir); may still be running")
    ],
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="PNG to write (default RUN_DIR/report.png)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="summary only (no matplotlib needed)")] = False,
) -> None:
    """Plot a run's train loss, eval metrics and learning rate; summarize best and final evals."""
    from peftcli.tools.report import report as run
    from peftcli.tools.report import report_table

    summary = run(run_dir, output, plot=not no_plot)
    if as_json:
        print(json.dumps(summary))
        return
    out_console.print(report_table(summary))


@app.command()
@guarded
def compare(
    targets: Annotated[
        list[str],
        typer.Argument(help="a recipe (then key.path=value overrides), or finished run directories"),
    ],
    methods: Annotated[
        Optional[str],
        typer.Option(help="with a recipe: methods to train, e.g. lora,ia3,prompt_tuning, or all"),
    ] = None,
    steps: Annotated[
        Optional[int], typer.Option(help="with a recipe: train.max_steps for every method")
    ] = None,
    sets: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", help="METHOD.key=value for one method (repeatable): lora.r=16, ia3.train.lr=3e-2"
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="directory for compare.{md,json,png} and runs")
    ] = Path("runs/compare"),
    as_json: Annotated[bool, typer.Option("--json", help="print compare.json instead of the table")] = False,
) -> None:
    """Compare PEFT methods: train a recipe with each, or compare finished runs, in one table."""
    from peftcli.recipe import RecipeError
    from peftcli.tools.compare import compare_recipe, compare_runs, compare_table

    command = "peftcli compare " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["compare"] else targets)
    first = Path(targets[0])
    if first.is_file():
        if not methods:
            raise RecipeError(
                "--methods", "is required with a recipe", "e.g. --methods lora,ia3,prompt_tuning"
            )
        result = compare_recipe(
            first, methods, output, targets[1:], sets or [], steps, command, console=err_console
        )
    else:
        if methods or steps or sets:
            raise RecipeError(
                "--methods",
                "--methods, --steps and --set apply to a recipe, not to run directories",
                "drop them",
            )
        result = compare_runs(targets, output, command, console=err_console)
    if as_json:
        print(json.dumps(result))
        return
    out_console.print(compare_table(result))
    for path in result["files"]:
        out_console.print(f"wrote {path}", highlight=False)


@app.command()
def methods(
    as_json: Annotated[
        bool, typer.Option("--json", help="print the registry as JSON (options with types and defaults)")
    ] = False,
) -> None:
    """List the registered PEFT methods."""
    from rich.table import Table

    from peftcli.methods.catalog import list_methods

    if as_json:
        from peftcli.schema import methods_as_json

        print(json.dumps(methods_as_json(), indent=2))
        return
    registered = list_methods()
    console = out_console
    if not console.is_terminal and "COLUMNS" not in os.environ:  # piped: one line per method, for grep
        console = Console(width=250)
    wide = console.width >= 100  # below that, five columns squeeze into unreadable slivers
    table = Table(
        title="methods", title_justify="left", caption=None if wide else "details: peftcli methods --json"
    )
    # the name never wraps or shortens, so `peftcli methods | grep parallel_adapter` finds it
    table.add_column("name", style="bold", no_wrap=True, min_width=max(len(c.name) for c in registered))
    table.add_column("description", overflow="fold")
    if wide:
        table.add_column("merges")
        table.add_column("peft type", overflow="fold")
        table.add_column("trainable parameters", overflow="fold")
    for cls in registered:
        details = ["yes" if cls.mergeable else "no", cls.peft_type or "-", cls.trainable_formula]
        table.add_row(cls.name, cls.description, *(details if wide else []))
    console.print(table)


@app.command()
@guarded
def schema(
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="write to this file instead of printing")
    ] = None,
) -> None:
    """Print the recipe's JSON Schema (draft 2020-12) for editors (YAML language server)."""
    from peftcli.schema import schema_text

    text = schema_text()
    if output is None:
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    out_console.print(f"schema written to {output}", highlight=False)


def show_recipe_warnings() -> None:
    """Print RecipeWarnings (remote code, pickle weights) as one yellow line each; leave others alone."""
    import warnings

    from peftcli.recipe import RecipeWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RecipeWarning):
            err_console.print(
                f"[bold yellow]warning:[/bold yellow] {message}", highlight=False, soft_wrap=True
            )
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    show_recipe_warnings()
    try:
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # a torchrun worker: report a crash to the launcher
            from peftcli.training.distributed import run_recording_errors

            run_recording_errors(app)
        else:
            app()
    except SystemExit:
        raise
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
