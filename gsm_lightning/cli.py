"""``gsm-lightning`` command line: LightningCLI over :class:`GSMModule` and any LightningDataModule.

    gsm-lightning fit --config configs/quickstart.yaml
    gsm-lightning test --config configs/quickstart.yaml --ckpt_path path/to.ckpt
    python -m gsm_lightning fit --config ...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from .export import read_torch_file
from .module import GSMModule

__all__ = ["GSMLightningCLI", "build_cli", "main"]


class GSMLightningCLI(LightningCLI):
    """LightningCLI over :class:`GSMModule` (``model:``) and any LightningDataModule (``data:`` with ``class_path``).

    With ``--ckpt_path`` the checkpoint's model hyperparameters replace the config's (the structure, budget and
    layers are the checkpoint's).  An explicit ``--model.<name>`` flag that the checkpoint would override with
    another value is an error naming the flag, never silently ignored."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        raw = sys.argv[1:] if args is None else args
        self._model_flags = _model_flags(raw) if isinstance(raw, (list, tuple)) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        model = self.config[sub].get("model")
        before = {k: _plain(model.get(k)) for k in getattr(self, "_model_flags", []) if model is not None and k in model}
        try:
            super()._parse_ckpt_path()
        except Exception:
            # a damaged file: a clear error naming it, not torch's advice to load it with weights_only=False
            read_torch_file(ckpt_path, "checkpoint")
            raise
        after = self.config[sub].get("model")
        conflicts = [f"--model.{k} {before[k]!r} (checkpoint: {_plain(after.get(k))!r})" for k in before
                     if _plain(after.get(k)) != before[k]]
        if conflicts:
            self.parser.error(
                f"--ckpt_path {ckpt_path} restores the model hyperparameters it was trained with, which would override "
                f"{', '.join(conflicts)}. Drop these flags to use the checkpoint's values, or train a new model "
                "(fit without --ckpt_path) to change them")


def _model_flags(args: list[str] | tuple[str, ...]) -> list[str]:
    """Top-level GSMModule arguments set by ``--model.<name>[.<sub>][=value]`` flags (``model.init_args.`` too)."""
    names: list[str] = []
    for a in args:
        if not isinstance(a, str) or not a.startswith("--model."):
            continue
        parts = a[len("--model."):].split("=", 1)[0].split(".")
        if parts[0] == "init_args" and len(parts) > 1:
            parts = parts[1:]
        if parts[0] and parts[0] not in ("backbone", "optimizer", "lr_scheduler") and parts[0] not in names:
            names.append(parts[0])
    return names


def _plain(value: Any) -> Any:
    """A comparable plain value (jsonargparse Namespaces become dicts, tuples lists)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
