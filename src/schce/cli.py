"""The ``schce`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

logger = logging.getLogger("schce")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("schce").setLevel(logging.INFO)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="schce", prog_name="schce")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Cell-type annotation with the Cell Ontology and the hierarchical cross-entropy loss."""
    ctx.obj = {"debug": debug}
    _configure_logging(debug)


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="demo_output",
    show_default=True,
    help="Where to write the annotated h5ad and the UMAP.",
)
@click.option(
    "--max-epochs", type=click.IntRange(min=1), default=60, show_default=True, help="Training epochs per model."
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out_dir: Path, max_epochs: int, seed: int) -> None:
    """Train CE and HCE MLPs on the bundled PBMC data and compare them on held-out cells."""
    from schce._demo import run_demo

    results = run_demo(out_dir, max_epochs=max_epochs, seed=seed)
    for loss, scores in results["scores"].items():
        click.echo(
            f"{loss.upper():>3} MLP on {results['n_test']} held-out cells: exact macro F1 = {scores['macro_f1']:.3f}, "
            f"hierarchy-corrected macro F1 = {scores['corrected_macro_f1']:.3f}"
        )
    click.echo(f"Wrote {results['h5ad']} and {results['umap']}")


def main() -> None:
    """Entry point: clear one-line errors unless ``--debug``."""
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except Exception as err:
        if debug:
            raise
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
