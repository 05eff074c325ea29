"""`mod-student`: train the student from the cache alone (stages init, d2d, d2s, pd).

    mod-student train --stage d2s --cache cache/ --student runs/d2d/final --out runs/d2s

NOT IMPLEMENTED YET: the student trainer is the next issue. This entry point exists so the console
script is installed; every command says so and exits with status 2 rather than pretend to train.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train():
    """Not implemented yet: the student trainer lands with the next issue."""
    typer.echo("mod-student train is not implemented yet: this release builds and inspects the teacher cache "
               "(mod-extract, mod-store). See README, 'Status'.", err=True)
    raise typer.Exit(2)


def main():
    app()
