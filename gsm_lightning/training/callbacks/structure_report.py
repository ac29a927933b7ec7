"""StructureReport: a table of every GBLR layer and the model totals at the end of ``fit``."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from ...report.structure import (
    print_structure_table,
    structure_summary,
    write_structure_csv,
)

__all__ = ["StructureReport"]


class StructureReport(Callback):
    """At the end of ``fit``: print a table of every GBLR layer and the model totals (rich when available) and
    write ``{filename}.json`` and ``{filename}.csv`` to the trainer's log directory (``trainer.log_dir``, else
    ``trainer.default_root_dir``).  See :func:`structure_summary` for the content.

    Args:
        filename: base name of the files.
        print_table: print the table.
        count_example_input: add a ``FlopCounterMode`` count of one forward of the module's
            ``example_input_array`` (when it has one).

    After the run, ``summary`` holds the report and ``paths`` the two files.  Rank 0 writes and prints.
    ``python -m gsm_lightning.report CKPT --out DIR`` writes the same files, figures and an HTML page from a
    checkpoint.
    """

    def __init__(self, filename: str = "structure", print_table: bool = True, count_example_input: bool = True) -> None:
        if not filename or os.sep in filename or (os.altsep and os.altsep in filename):
            raise ValueError(f"filename must be a plain non-empty file name without directories, got {filename!r}")
        self.filename = filename
        self.print_table = print_table
        self.count_example_input = count_example_input
        self.summary: dict[str, Any] | None = None
        self.paths: tuple[str, str] | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: call it on every rank
        if trainer.is_global_zero:
            self.write(pl_module, log_dir)

    def write(self, model: nn.Module, directory: str) -> tuple[str, str]:
        """Build the report of ``model``, print it (if ``print_table``) and write the JSON and CSV files into
        ``directory``; returns their paths."""
        example = getattr(model, "example_input_array", None) if self.count_example_input else None
        if example is not None:
            from lightning.fabric.utilities import move_data_to_device

            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            example = move_data_to_device(example, device)
        summary = structure_summary(model, example)
        os.makedirs(directory, exist_ok=True)
        json_path = os.path.join(directory, f"{self.filename}.json")
        csv_path = os.path.join(directory, f"{self.filename}.csv")
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
        write_structure_csv(csv_path, summary)
        if self.print_table:
            print_structure_table(summary)
        self.summary, self.paths = summary, (json_path, csv_path)
        return self.paths
