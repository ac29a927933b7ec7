"""``gsm-lightning`` command line: LightningCLI over :class:`GSMModule` and any LightningDataModule.

    gsm-lightning fit --config configs/quickstart.yaml
    gsm-lightning test --config configs/quickstart.yaml --ckpt_path path/to.ckpt
    python -m gsm_lightning fit --config ...
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from .module import GSMModule

__all__ = ["GSMLightningCLI", "build_cli", "main"]


class GSMLightningCLI(LightningCLI):
    """LightningCLI over :class:`GSMModule` (``model:``) and any LightningDataModule (``data:`` with ``class_path``)."""


def build_cli(args: Any = None, run: bool = True) -> GSMLightningCLI:
    """Build (and by default run) the CLI; ``args`` as for LightningCLI (list, dict or None for sys.argv)."""
    return GSMLightningCLI(
        GSMModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: Any = None) -> None:
    """Entry point of ``gsm-lightning`` and ``python -m gsm_lightning``."""
    build_cli(args)


if __name__ == "__main__":
    main()
