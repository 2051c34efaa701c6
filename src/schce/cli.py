"""The ``schce`` command line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import click

logger = logging.getLogger("schce")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("schce").setLevel(logging.INFO)


def _one_line(err: BaseException) -> str:
    # KeyError's str() quotes its message; multi-line messages are folded so the error stays one line.
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


class _CleanErrors(click.Group):
    """Turn an exception of a subcommand into one ``Error: ...`` line and exit code 1, unless ``--debug``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:
            if (ctx.obj or {}).get("debug"):
                raise
            raise click.ClickException(_one_line(err)) from err


def _loss_names() -> tuple[str, ...]:
    """The losses :class:`~schce.HCEClassifier` accepts (from the light constants module: ``--help`` stays fast)."""
    from schce._constants import LOSSES

    return tuple(LOSSES)


def _default_loss() -> str:
    """The default loss of :class:`~schce.HCEClassifier`, so the command line never disagrees with the API."""
    from schce._constants import DEFAULT_LOSS

    return DEFAULT_LOSS


# ---------------------------------------------------------------------------------------------------- input checks
# All of these run before any h5ad or model is loaded, so a typo fails in a second, not after minutes.
def _existing_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise click.ClickException(f"{what} {path} does not exist.")
    if not path.is_file():
        raise click.ClickException(f"{what} {path} is not a file.")
    return path


def _columns(path: Path) -> dict[str, list[str]]:
    """The ``obs`` and ``var`` column names and the layer names of an h5ad file, read without loading the data."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            found = {g: [str(c) for c in _as_list(f[g].attrs.get("column-order", []))] for g in ("obs", "var")}
            found["layers"] = sorted(f["layers"].keys()) if "layers" in f else []
            return found
    except (OSError, KeyError) as err:
        raise click.ClickException(f"{path} is not a readable .h5ad file ({_one_line(err)}).") from err


def _as_list(value) -> list:
    if isinstance(value, str | bytes):
        return [value]
    return list(value)


def _require_columns(path: Path, columns: dict[str, list[str]], where: str, keys: dict[str, str | None]) -> None:
    available = columns[where]
    what = "a layer" if where == "layers" else f"a column of {where}"
    for option, key in keys.items():
        if key is not None and key not in available:
            raise click.ClickException(
                f"{option} {key!r} is not {what} in {path}; available: {', '.join(available) or 'none'}."
            )


def _check_model_dir(path: Path) -> None:
    from schce import _io

    try:
        if (path / _io.ENSEMBLE_FILE).is_file():
            from schce._model_file import read_ensemble

            read_ensemble(path, "HCEEnsemble")
        else:
            _io.read_meta(path)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(_one_line(err)) from err


def _load_model(path: Path):
    """The model saved at ``path``: an :class:`~schce.HCEEnsemble` when it holds one, else an HCEClassifier."""
    from schce import _io
    from schce.model import HCEClassifier, HCEEnsemble

    return (HCEEnsemble if (path / _io.ENSEMBLE_FILE).is_file() else HCEClassifier).load(path)


def _check_output(path: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    for source in inputs:
        if path.resolve() == source.resolve():
            raise click.ClickException(f"--out {path} is an input; choose another path (inputs are never overwritten).")
    if path.exists() and not overwrite:
        raise click.ClickException(f"{path} already exists. Pass --overwrite to replace it, or choose another --out.")


def _read_h5ad(path: Path):
    import anndata as ad

    logger.info("Reading %s.", path)
    return ad.read_h5ad(path)


def _echo_metrics(title: str, values: dict[str, float]) -> None:
    click.echo(title)
    for name, value in values.items():
        click.echo(f"  {name:<28} {value:.4f}" if isinstance(value, float) else f"  {name:<28} {value}")


# ---------------------------------------------------------------------------------------------------- commands
@click.group(cls=_CleanErrors, context_settings={"help_option_names": ["-h", "--help"]})
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
    """Train CE, the published HCE and schce's default on bundled PBMCs annotated at two depths; compare them."""
    from schce._demo import LOSS_NAMES, run_demo

    results = run_demo(out_dir, max_epochs=max_epochs, seed=seed)
    click.echo(
        f"Reference: {results['n_train']} PBMCs from two studies; study B called its {results['n_coarse']} T cells "
        f"only 'T cell'. Scored on {results['n_test']} held-out cells with fine labels (macro F1):"
    )
    for loss, scores in results["scores"].items():
        click.echo(
            f"  {LOSS_NAMES.get(loss, loss):27s} exact {scores['macro_f1']:.3f}   "
            f"hierarchy-corrected {scores['corrected_macro_f1']:.3f}"
        )
    click.echo(
        "Exact counts a call right only when it is the true label; hierarchy-corrected also accepts a finer label "
        "below it. CE treats 'T cell' as one more class that competes with its subtypes; the published HCE lets the "
        "subtypes absorb it but also pushes calls below the true label; the default reads 'T cell' as 'one of its "
        "subtypes' only in the study that used it that way."
    )
    click.echo(f"Wrote {results['h5ad']} and {results['umap']}")


def _query_options(command):
    """The options ``predict`` and ``evaluate`` share: how to read the query and when to back off."""
    gene_help = "var column with gene IDs of the model's type."
    command = click.option("--gene-symbols", default=None, help=gene_help)(command)
    command = click.option("--layer", default=None, help="Layer with the expression; default X.")(command)
    return click.option(
        "--coarse-threshold",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.5,
        show_default=True,
        help="Subtree probability needed for the coarse back-off call.",
    )(command)


_INPUT = click.Path(dir_okay=False, path_type=Path)
_MODEL = click.Path(path_type=Path)


@cli.command()
@click.argument("input_path", metavar="INPUT.h5ad", type=_INPUT)
@click.option("--labels-key", required=True, help="obs column of cell types: CL IDs or CL names / synonyms.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@click.option("--batch-key", default=None, help="obs column of batches (for batch terms and the registry).")
@click.option("--layer", default=None, help="Layer with the expression; default X. Raw counts preferred.")
@click.option(
    "--backbone", type=click.Choice(["linear", "mlp", "tabnet"]), default="mlp", show_default=True, help="Network."
)
@click.option(
    "--loss", type=click.Choice(_loss_names()), default=_default_loss(), show_default=True, help="Training loss."
)
@click.option("--max-epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=None,
    help="Cells per step; default from n cells (linear: all of them, by L-BFGS).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Makes training deterministic on CPU.")
@click.option("--split-key", default=None, help="obs column of donors / samples: whole groups go to validation.")
@click.option("--validation-size", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--n-hidden", type=click.IntRange(min=1), default=None, help="MLP width (default 256).")
@click.option("--n-layers", type=click.IntRange(min=1), default=None, help="MLP depth (default 3).")
@click.option(
    "--n-members",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Above 1: a seed ensemble (schce.HCEEnsemble), member i trained with seed + 1000*i; N times the time.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Lightning's progress bar.")
@click.option(
    "--label-mapping",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV with columns label, ontology_term_id mapping free-text labels to CL (from schce.propose_label_mapping).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def train(
    input_path: Path,
    labels_key: str,
    out_dir: Path,
    batch_key: str | None,
    layer: str | None,
    backbone: str,
    loss: str,
    max_epochs: int,
    batch_size: int | None,
    seed: int,
    split_key: str | None,
    validation_size: float,
    n_hidden: int | None,
    n_layers: int | None,
    n_members: int,
    progress: bool,
    label_mapping: Path | None,
    overwrite: bool,
) -> None:
    """Train a classifier on INPUT.h5ad and save it to --out.

    Validation cells are held out; training keeps the weights of the epoch with the lowest class-weighted validation
    loss and prints that epoch's hierarchy-corrected macro F1 (the linear model is fitted by full-batch L-BFGS and
    keeps the converged weights). With --n-members N it trains a seed ensemble and prints this for every member.
    """
    _existing_file(input_path, "Input")
    if label_mapping is not None:
        _existing_file(label_mapping, "Label mapping")
    _check_output(out_dir, overwrite)
    from schce._io import check_save_target

    check_save_target(out_dir, overwrite)  # --overwrite never deletes files schce did not write
    arch = {k: v for k, v in {"n_hidden": n_hidden, "n_layers": n_layers}.items() if v is not None}
    if arch and backbone != "mlp":
        raise click.ClickException(f"--n-hidden / --n-layers apply to --backbone mlp only, not {backbone}.")
    keys = {"--labels-key": labels_key, "--batch-key": batch_key, "--split-key": split_key}
    columns = _columns(input_path)
    _require_columns(input_path, columns, "obs", keys)
    _require_columns(input_path, columns, "layers", {"--layer": layer})

    from schce._constants import MONITOR
    from schce.model import HCEClassifier, HCEEnsemble
    from schce.vocabulary import read_label_mapping

    mapping = read_label_mapping(label_mapping) if label_mapping is not None else None  # a bad table fails here
    adata = _read_h5ad(input_path)
    HCEClassifier.setup_anndata(adata, labels_key=labels_key, layer=layer, batch_key=batch_key, label_mapping=mapping)
    if n_members > 1:
        model = HCEEnsemble(adata, n_members=n_members, backbone=backbone, loss=loss, **arch)
    else:
        model = HCEClassifier(adata, backbone=backbone, loss=loss, **arch)
    model.train(
        max_epochs=max_epochs,
        batch_size=batch_size,
        seed=seed,
        split_key=split_key,
        validation_size=validation_size,
        enable_progress_bar=progress,
    )
    model.save(out_dir, overwrite=overwrite)
    members = model.members if n_members > 1 else [model]
    for i, member in enumerate(members):
        history = member.history_.get(MONITOR)
        if history is not None and member.best_epoch_ in history.index:
            score = float(history.loc[member.best_epoch_].iloc[0])
            kept = "Converged at epoch" if member.optimizer_ == "lbfgs" else "Best epoch"
            prefix = f"Member {i} (seed {model.seeds_[i]}): " if n_members > 1 else ""
            click.echo(f"{prefix}{kept} {member.best_epoch_}: validation hierarchy-corrected macro F1 = {score:.4f}")
    what = (
        f"an ensemble of {n_members} {loss.upper()} {backbone} models"
        if n_members > 1
        else f"a {loss.upper()} {backbone}"
    )
    click.echo(
        f"Trained {what} on {len(members[0].train_indices_)} cells "
        f"({model.hierarchy.n_labels} labels, {len(model.genes)} genes); saved to {out_dir}"
    )


@cli.command()
@click.argument("model_dir", metavar="MODEL_DIR", type=_MODEL)
@click.argument("input_path", metavar="INPUT.h5ad", type=_INPUT)
@click.option("--out", "out_path", required=True, type=_INPUT, help="Annotated h5ad to write (never the input).")
@_query_options
@click.option("--majority-voting", is_flag=True, help="Also smooth the calls over clusters (subtree-aware vote).")
@click.option("--over-clustering", default=None, help="obs column of clusters to vote in; default: Leiden on X_schce.")
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Cells below this calibrated confidence are called 'unassigned'.",
)
@click.option(
    "--min-gene-overlap",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Below this fraction of the model's genes in the query, every cell is 'unassigned'.",
)
@click.option(
    "--figures",
    "figures_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for umap.png, prediction_counts.png and confidence.png.",
)
@click.option(
    "--hierarchical-scores",
    type=click.Choice(["dense", "sparse", "none"]),
    default="dense",
    show_default=True,
    help="obsm['schce_hierarchical_scores']: cells × terms, each cell's 32 highest scores (CSR), or none (large "
    "queries).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file (and its .csv).")
def predict(
    model_dir: Path,
    input_path: Path,
    out_path: Path,
    coarse_threshold: float,
    layer: str | None,
    gene_symbols: str | None,
    majority_voting: bool,
    over_clustering: str | None,
    min_confidence: float,
    min_gene_overlap: float,
    figures_dir: Path | None,
    hierarchical_scores: str,
    overwrite: bool,
) -> None:
    """Annotate INPUT.h5ad with a saved model or ensemble, write the result to --out and a CSV of the calls beside it.

    The output has the prediction columns in obs (schce_prediction, schce_prediction_coarse, schce_confidence, ...),
    the probabilities, hierarchical scores and embedding (X_schce) in obsm. The CSV (--out with the suffix .csv)
    has one row per cell: the calls, confidence, unassigned reason and, with --majority-voting, the votes.
    """
    _check_model_dir(model_dir)
    _existing_file(input_path, "Input")
    csv_path = out_path.with_suffix(".csv")
    _check_output(out_path, overwrite, [input_path])
    _check_output(csv_path, overwrite, [input_path])
    columns = _columns(input_path)
    _require_columns(input_path, columns, "var", {"--gene-symbols": gene_symbols})
    _require_columns(input_path, columns, "layers", {"--layer": layer})
    _require_columns(input_path, columns, "obs", {"--over-clustering": over_clustering})
    if over_clustering is not None and not majority_voting:
        raise click.ClickException("--over-clustering applies with --majority-voting only.")

    from schce._io import write_file_atomically

    model = _load_model(model_dir)
    adata = _read_h5ad(input_path)
    obs = model.predict(
        adata, layer=layer, gene_symbols=gene_symbols, coarse_threshold=coarse_threshold,
        majority_voting=majority_voting, over_clustering=over_clustering, min_confidence=min_confidence,
        min_gene_overlap=min_gene_overlap, hierarchical_scores=hierarchical_scores,
    )  # fmt: skip
    write_file_atomically(out_path, lambda tmp: adata.write_h5ad(tmp))
    table = obs.drop(columns=[c for c in obs.columns if c.endswith("_over_clustering")])
    write_file_atomically(csv_path, lambda tmp: table.rename_axis("cell").to_csv(tmp))
    overlap = adata.uns["schce"]["gene_overlap"]
    top = obs["schce_prediction"].value_counts().head(5)
    click.echo(
        f"Annotated {adata.n_obs} cells ({overlap['n_found']} of {overlap['n_model_genes']} model genes found); "
        f"most frequent: " + ", ".join(f"{name} ({n})" for name, n in top.items() if n)
    )
    click.echo(f"Wrote {out_path} and {csv_path}")
    if figures_dir is not None:
        from schce._prediction_figures import save_prediction_figures

        written = save_prediction_figures(adata, figures_dir)
        click.echo(f"Figures: {', '.join(str(p) for p in written)}")


@cli.command()
@click.argument("model_dir", metavar="MODEL_DIR", type=_MODEL)
@click.argument("input_path", metavar="INPUT.h5ad", type=_INPUT)
@click.option("--labels-key", required=True, help="obs column with the true cell types.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report dir.")
@click.option(
    "--groupby",
    multiple=True,
    help="obs column to break the metrics down by (repeatable); default: assay, dataset_id, disease, tissue, "
    "tissue_general where present.",
)
@_query_options
@click.option("--overwrite", is_flag=True, help="Write into an existing, non-empty --out directory.")
def evaluate(
    model_dir: Path,
    input_path: Path,
    labels_key: str,
    out_dir: Path,
    groupby: tuple[str, ...],
    coarse_threshold: float,
    layer: str | None,
    gene_symbols: str | None,
    overwrite: bool,
) -> None:
    """Score a saved model (or HCEEnsemble) on labelled cells and write the metric tables to --out.

    Writes overall_metrics.csv, per_class_metrics.csv, per_<column>_metrics.csv and detailed_results.parquet;
    metrics are exact and hierarchy-corrected (a prediction is correct when it is the truth or a descendant).
    """
    _check_model_dir(model_dir)
    _existing_file(input_path, "Input")
    if out_dir.exists() and not out_dir.is_dir():
        raise click.ClickException(f"--out {out_dir} is a file; give a directory for the report.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise click.ClickException(f"{out_dir} is not empty; pass --overwrite to write into it, or another --out.")
    columns = _columns(input_path)
    _require_columns(input_path, columns, "obs", {"--labels-key": labels_key})
    for column in groupby:
        _require_columns(input_path, columns, "obs", {"--groupby": column})
    _require_columns(input_path, columns, "var", {"--gene-symbols": gene_symbols})
    _require_columns(input_path, columns, "layers", {"--layer": layer})

    from schce.evaluation import DEFAULT_GROUPBY

    model = _load_model(model_dir)
    adata = _read_h5ad(input_path)
    result = model.evaluate(
        adata,
        labels_key=labels_key,
        groupby=groupby or DEFAULT_GROUPBY,
        output_dir=out_dir,
        layer=layer,
        gene_symbols=gene_symbols,
        coarse_threshold=coarse_threshold,
    )
    shown = ["n_cells", "n_not_scorable", "accuracy", "corrected_accuracy", "macro_f1", "corrected_macro_f1"]
    values = {k: result[k] for k in shown if k in result.overall.index}
    values = {k: int(v) if k.startswith("n_") else v for k, v in values.items()}
    _echo_metrics(f"{model.loss.upper()} {model.backbone} on {input_path.name}:", values)
    click.echo(f"Wrote the report to {out_dir}")


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
        click.echo(f"Error: {_one_line(err)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
