"""Command line: `fedprune run`, `suite`, `report`, `export`, `compare`, `options`, `env`.

The list of config options shown by `--help` is generated from config.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedprune.config import ConfigError, load_config, options_help
from fedprune.report.progress import shown

app = typer.Typer(help="fedprune: federated adaptation of transformer language models with "
                  "structured sparsity.", no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False)
console = Console()

RUN_HELP = f"""Run (or resume) a federated experiment described by CONFIG (a TOML file).

Overrides are section.key=value pairs, values in TOML syntax, for example
federation.rounds=5 peft.r=8 'peft.target_modules=["q","v"]'.

\b
Every option, with its default:
{options_help()}
"""


def quiet_libraries() -> None:
    """Keep the console for fedprune's own progress: no load reports or library bars."""
    import warnings

    from fedprune.data import quiet_datasets
    from fedprune.structure.model import quiet_transformers

    quiet_datasets()
    quiet_transformers()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


@app.command(help=RUN_HELP)
def run(
    config: Annotated[Path, typer.Argument(help="Experiment TOML file (see configs/).")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="section.key=value overrides, applied after the file.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Run directory (default: <run.out_dir>/<run.name>).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in the run directory from its last checkpoint.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    from fedprune.data import DataError
    from fedprune.sim.checkpoint import CheckpointError
    from fedprune.sim.runner import run as run_experiment
    from fedprune.structure.model import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        cfg = load_config(config, overrides or [])
        with shown(not quiet):
            run_dir = run_experiment(cfg, out, resume=resume, progress=not quiet)
    except (ConfigError, DataError, ModelLoadError, CheckpointError) as e:
        _fail(str(e))
    console.print(f"run directory: {run_dir}")
    report(run_dir)


@app.command()
def suite(
    name: Annotated[str, typer.Argument(help="ablation | sparsity | noniid | table1 | fedspallm | prufed | optimizers | "
        "robustness | privacy | peft | tasks | backbones")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="section.key=value overrides applied to every variant.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Base experiment TOML shared by the variants (default: "
        "configs/suite.toml; configs/fedspallm.toml for fedspallm, configs/prufed_suite.toml "
        "for prufed, configs/paper_table1.toml for table1).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Suite directory (default: runs/suite-<name>).")] = None,
    smoke: Annotated[bool, typer.Option(
        "--smoke", help="Tiny sizes (seconds per run) to check the pipeline.")] = False,
    only: Annotated[str, typer.Option(
        "--only", help="Run only the variants whose label matches one of these globs "
        "(comma-separated), e.g. 'C4-*' or 'AoH-dir0.1-*,FedAvg-dir0.1-*'.")
    ] = "*",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Run an experiment suite (AoH's ablations, FedSpaLLM's or PruFed's comparison) and write
    its report.md and PNG figures.

    \b
    ablation: B1 FedAvg, B2 random heads, AoH x random / loss selection at 90 % sparsity
              (+ AoH structural): Table 1 and Fig. 3.
    sparsity: AoH at 0, 50, 70, 90, 95 % sparsity, adapter and structural modes, 3 seeds
              (mean ± sd): Fig. 4.
    noniid:   FedAvg and AoH on IID and Dirichlet 2.0 / 0.5 / 0.1, 3 seeds (AoH − FedAvg
              paired by seed): Table 5 and Fig. 5.
    table1:   Table 1 at the paper's scale (configs/paper_table1.toml: 100 clients, 2 per
              round, 100 rounds, LoRA on q and v, P = {B}): B1, B2 and AoH x random / loss
              selection, 3 seeds.
    fedspallm: FedSpaLLM (l0 mean + mask expansion) against naive FedAvg, FedAvg +
              re-pruning, centralized and each-client-alone pruning of SmolLM2, 4 and 8
              clients, 50 % and 2:4, a 30 / 50 / 70 % sweep, and the dense model.
    prufed:   PruFed's 7 layer-dropping strategies x tiers 0.75 / 0.5 / 0.25 beside a full
              tier, headline and category tasks, 3 seeds, against exclusive, centralized,
              alone, untuned and all-smallest baselines (long: see sim/suites.py).
    optimizers: FedAvg-LoRA and AoH at 90 % with each server optimizer (FedAvgM, FedAdagrad,
              FedYogi, FedAdam), FedProx and SCAFFOLD against FedAvg, IID and Dirichlet
              0.5 / 0.1, 3 seeds (126 runs, ~2 min each on 2 cores).
    robustness: FedAvg-LoRA, 20 clients / 10 per round, 20 % attackers: every [attack]
              (sign flip, scaling, noise, ALIE, IPM, label flip) under every robust rule
              (mean, median, trimmed mean, Krum, Multi-Krum, Bulyan), and AoH under importance
              inflation with and without capped, normalised head weights.
    privacy:  DP-FedAvg's accuracy against epsilon: FedAvg-LoRA and AoH at 90 %, 20
              clients, Poisson sampling of 10 per round, clipping 0.5, noise multipliers
              0.3 / 0.6 / 1 / 2 against no DP; AoH also with noise on its head scores.
    peft:     AoH Table 3: LoRA r = 4 / 8 / 16, IA3, prompt tuning (head chunks), prefix
              tuning and full fine-tuning, each with FedAvg and AoH at 50 / 90 % sparsity:
              seconds per local epoch, upload, OPs, accuracy and the largest sparsity above
              chance.
    tasks:    AoH Table 2: FedAvg and AoH at 90 % on classification (MiniLM + BBC News)
              and headline generation (SmolLM2, ROUGE-1/2/L) for 10 / 2, 100 / 2 and
              1000 / 20 clients: metrics, upload, OPs and FLOPs per client.
    backbones: AoH Table 4 at 100 / 2 clients: MiniLM and SmolLM2 trained (FedAvg, AoH 50 /
              90 %); DistilBERT, RoBERTa, GPT-2, T5-small / base, BART-base at their
              published sizes with random weights, one round: bytes and OPs only.
              peft, tasks and backbones together: 35 min wall on a 2-core AMD EPYC Zen 4
              (bf16) as two one-thread processes split by --only (README).
    A finished variant is reused and an interrupted one resumed when the suite is re-run.
    """
    from fedprune.data import DataError
    from fedprune.sim.suites import SUITES, run_suite
    from fedprune.structure.model import ModelLoadError

    if name not in SUITES:
        _fail(f"unknown suite {name!r}; suites are {', '.join(SUITES)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        with shown(not quiet):
            path = run_suite(name, config, overrides or [], out or Path(f"runs/suite-{name}"),
                             smoke=smoke, progress=not quiet, only=only)
    except (ConfigError, DataError, ModelLoadError) as e:
        _fail(str(e))
    console.print(f"report: {path}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Print a summary table of a run directory (and write its report.md)."""
    from fedprune.report.summary import summarize, write_report

    try:
        summary = summarize(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    write_report(run_dir)
    table = Table(title=f"fedprune run {summary['run']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float):
            text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
        else:
            text = "–" if value is None else str(value)
        table.add_row(key, text)
    console.print(table)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    out_dir: Annotated[Path, typer.Argument(help="New (or empty) output folder.")],
) -> None:
    """Write a run's final global model as folders transformers and peft load, each with a
    model card README.md.

    \b
    fedavg / random_heads / aoh: a peft adapter (PeftModel.from_pretrained(base, OUT_DIR)).
    fedspallm: the pruned causal LM (AutoModelForCausalLM.from_pretrained(OUT_DIR)).
    prufed:    OUT_DIR/tier<t> per tier: its kept layers with LoRA merged (and OUT_DIR/full
               when no tier keeps every layer).
    """
    from fedprune.data import DataError
    from fedprune.export import ExportError, export_run
    from fedprune.structure.model import ModelLoadError

    quiet_libraries()
    try:
        folders = export_run(run_dir, out_dir)
    except (ExportError, ConfigError, DataError, ModelLoadError) as e:
        _fail(str(e))
    for folder in folders:
        console.print(f"exported: {folder}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Folder for compare.md and compare.png.")] = Path("runs/compare"),
) -> None:
    """Compare runs: their config differences and final metrics (mean ± sd over runs that
    differ only by run.seed), printed and written to OUT/compare.md, with their metric
    curves on shared axes in OUT/compare.png."""
    from fedprune.report.compare import CompareError, compare_runs

    try:
        result = compare_runs(run_dirs, out)
    except CompareError as e:
        _fail(str(e))
    table = Table(title=f"fedprune compare ({len(run_dirs)} runs)")  # one column per group
    table.add_column(result.headers[0], overflow="fold")
    for row in result.rows:
        table.add_column(row[0], justify="right", overflow="fold")
    for i, header in enumerate(result.headers[1:], 1):
        table.add_row(header, *(row[i] for row in result.rows))
    console.print(table)
    console.print(f"written: {result.markdown}, {result.figure}")


@app.command()
def options() -> None:
    """List every configuration option with its default and meaning."""
    print(options_help())


@app.command()
def env(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Versions, the CPU and its SIMD features, threads, and what model.compute_dtype=auto
    resolves to here (every run records the same in environment.json)."""
    import json

    from fedprune.environment import environment

    info = environment()
    if as_json:
        print(json.dumps(info, indent=1))
        return
    cpu = info["cpu"]
    features = ", ".join(f"{k.upper().replace('_', '-')} {'yes' if cpu[k] else 'no'}"
                         for k in ("avx2", "avx512", "avx512_bf16", "amx"))
    print(" ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()))
    print(f"cpu: {cpu['model']} ({cpu['machine']}; torch kernels: {cpu['capability']})")
    print(f"simd: {features}")
    print(f"threads: {info['threads']}; model.compute_dtype=auto -> "
          f"{info['auto_compute_dtype']}; cuda: {'yes' if info['cuda'] else 'no'}")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"fedprune {version('fedprune')}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version.")] = False
         ) -> None:
    """fedprune: federated adaptation of transformer language models with structured
    sparsity. `fedprune env` describes this machine."""
