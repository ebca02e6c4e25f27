"""``medpeft data``: inspect a dataset, write split files, build the image cache."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from medpeft.cli.app import _on_missing, app, console

data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets, write split files, build image caches.")
app.add_typer(data_app, name="data")


def _data_table(config: Path, set_: Optional[List[str]], on_missing: Optional[str] = None):
    """The data section of CONFIG (its other sections are not read) and its table with the split."""
    from medpeft.config import load_data_config
    from medpeft.data import read_split_dataset

    data = load_data_config(config, list(set_ or []) + _on_missing(on_missing))
    return data, read_split_dataset(data)


@data_app.command("inspect")
def data_inspect(config: Path = typer.Argument(..., help="YAML config: only its data section is read."),
                 set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                  help="Override a key (repeatable)."),
                 check: bool = typer.Option(False, "--check-images", help="Also decode every image as a run "
                                            "would (unusable ones: an error listing them, or skipped with "
                                            "--on-missing skip)."),
                 on_missing: Optional[str] = typer.Option(None, "--on-missing", help="error or skip unusable images."),
                 as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON.")):
    """Images, patients, views and label prevalence per split, as a run of CONFIG would see them."""
    import json

    from rich import box

    from medpeft.data.images import check_images
    from medpeft.data.summary import summarize, summary_rows

    data, table = _data_table(config, set_, on_missing)
    if check:
        table = check_images(table, data, progress=console.is_terminal)
    summary = summarize(table, data.labels)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    view = Table(title=f"{data.format}: {data.csv}", box=box.SIMPLE_HEAD, title_justify="left")
    view.add_column("", no_wrap=True)
    for name in summary["splits"]:
        view.add_column(name, justify="right", no_wrap=True)
    for name, cells in summary_rows(summary):
        view.add_row(name, *cells)
    console.print(view)
    console.print("[dim]labels: positive images and their share of the images whose label is known[/dim]")


@data_app.command("split")
def data_split(config: Path = typer.Argument(..., help="YAML run config (its data section is used)."),
               out: Path = typer.Option(..., "--out", help="Folder for the split files."),
               fractions: str = typer.Option("0.01,0.1,1", help="Label fractions of train, nested."),
               set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                  help="Override a key (repeatable).")):
    """Write train (one file per label fraction, nested), val and test split files with content hashes."""
    from medpeft.config import SplitConfig
    from medpeft.data.label_fractions import label_fraction_subsets, write_split_file
    from medpeft.errors import ConfigError

    try:  # each as data.split.label_fraction takes it
        wanted = [SplitConfig(label_fraction=f).label_fraction for f in fractions.split(",")]
    except ConfigError as e:
        raise ConfigError(f"--fractions {fractions}: {e}") from None
    data, table = _data_table(config, set_)
    train = table[table["split"] == "train"]
    subsets = label_fraction_subsets(train, list(data.labels), wanted, data.split.seed)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": str(config), "seed": data.split.seed}
    for fraction, ids in subsets.items():
        digest = write_split_file(ids, out / f"train_{fraction:g}.txt", {**meta, "label_fraction": fraction})
        console.print(f"train {fraction:g}: {len(ids)} images  sha256 {digest[:16]}  -> {out / f'train_{fraction:g}.txt'}")
    for name in ("val", "test"):
        ids = table.loc[table["split"] == name, "image_id"].tolist()
        if ids:
            digest = write_split_file(ids, out / f"{name}.txt", meta)
            console.print(f"{name}: {len(ids)} images  sha256 {digest[:16]}  -> {out / f'{name}.txt'}")


@data_app.command("cache")
def data_cache(config: Path = typer.Argument(..., help="YAML run config (data.cache_dir must be set)."),
               set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                  help="Override a key (repeatable)."),
               workers: int = typer.Option(2, help="Decoding processes."),
               on_missing: Optional[str] = typer.Option(None, "--on-missing",
                                                        help="error or skip missing/unreadable images.")):
    """Decode the images a run of CONFIG uses once into the memmap cache it will read."""
    from medpeft.data.cache import build_cache
    from medpeft.data.images import check_images
    from medpeft.errors import ConfigError

    from medpeft import load_config
    from medpeft.data import read_split_dataset

    run_config = load_config(config, list(set_ or []) + _on_missing(on_missing), base={"output_dir": "-"})
    table = read_split_dataset(run_config.data)
    if not run_config.data.cache_dir:
        raise ConfigError("data.cache_dir is not set: name the folder for the cache (--set data.cache_dir=DIR)")
    table = check_images(table, run_config.data, progress=console.is_terminal)
    cache = build_cache(table["image_id"].tolist(), table["path"].tolist(), run_config.model.img_size,
                        run_config.data.cache_dir, workers=workers, progress=console.is_terminal,
                        alpha=run_config.data.alpha)
    size_mb = len(cache) * cache.size * cache.size / 2**20
    console.print(f"{len(cache)} images at {cache.size}x{cache.size} ({size_mb:.1f} MB) in {cache.path}")
