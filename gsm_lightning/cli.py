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

__all__ = ["GSMLightningCLI", "main"]


class GSMLightningCLI(LightningCLI):
    """LightningCLI whose ``model.num_classes`` follows ``data.num_classes`` unless set explicitly."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: Any = None, run: bool = True) -> GSMLightningCLI:
    """Entry point of ``gsm-lightning`` and ``python -m gsm_lightning``."""
    return GSMLightningCLI(
        GSMModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
