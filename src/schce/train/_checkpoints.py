"""Lightning checkpoints of a training run: where they go, and which one a resumed run starts from."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl

BEST, LAST = "best", "last"


def check_checkpoint_args(
    checkpoint_dir: str | os.PathLike | None, ckpt_path: str | os.PathLike | None, every_n_steps: int | None
) -> tuple[Path | None, Path | None]:
    """Validate the checkpoint arguments before any work; return the directory and the checkpoint to resume from.

    ``ckpt_path="last"`` means ``checkpoint_dir/last.ckpt``. Nothing is created here: a missing directory only needs
    a writable ancestor.
    """
    directory = None
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"checkpoint_dir={str(directory)!r} is a file; name a directory.")
        existing = directory
        while not existing.exists():
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(
                f"checkpoint_dir={str(directory)!r} is not writable ({str(existing)!r} denies writing); "
                "name a directory you can write to."
            )
    if every_n_steps is not None:
        if directory is None:
            raise ValueError("checkpoint_every_n_steps needs checkpoint_dir to write the checkpoints to.")
        if every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be a positive number of steps, got {every_n_steps}.")
    if ckpt_path is None:
        return directory, None
    if str(ckpt_path) == LAST:
        if directory is None:
            raise ValueError('ckpt_path="last" resumes from checkpoint_dir/last.ckpt: pass checkpoint_dir as well.')
        path = directory / f"{LAST}.ckpt"
        if not path.is_file():
            raise FileNotFoundError(
                f"There is no {path.name} in {str(directory)!r} to resume from; train without ckpt_path to "
                "start afresh."
            )
        return directory, path
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist; pass a .ckpt file or 'last'.")
    return directory, path


def checkpoint_callbacks(
    directory: Path, monitor: str | None, every_n_steps: int | None, mode: str = "max"
) -> list[pl.Callback]:
    """``best.ckpt`` (best ``monitor`` by ``mode``, when there is one) and ``last.ckpt`` in ``directory``.

    ``last.ckpt`` is rewritten at the end of every epoch, or every ``every_n_steps`` training steps when given (then
    an interrupted run resumes mid-epoch).
    """
    callbacks: list[pl.Callback] = [
        # Without a monitor, top-1 is the newest checkpoint: one file, rewritten, whatever triggers the save.
        pl.callbacks.ModelCheckpoint(
            dirpath=directory,
            filename=LAST,
            save_top_k=1,
            every_n_train_steps=every_n_steps,
            enable_version_counter=False,
        )
    ]
    if monitor is not None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=directory,
                filename=BEST,
                monitor=monitor,
                mode=mode,
                save_top_k=1,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    return callbacks
