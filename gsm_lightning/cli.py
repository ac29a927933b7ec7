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

from .io.checkpoint import read_torch_file
from .training.legacy import migrate_hparams
from .training.module import GSMModule

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
        before = {k: _plain(_get(model, k)) for k in getattr(self, "_model_flags", []) if model is not None}
        # a damaged file: a clear error naming it, not torch's advice to load it with weights_only=False
        ckpt = read_torch_file(ckpt_path, "checkpoint")
        hparams = dict(ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {})
        hparams.pop("_instantiator", None)
        if hparams:
            # a checkpoint of an earlier version stores the flat arguments: parse them in today's form
            try:
                self.config = self.parser.parse_object({sub: {"model": migrate_hparams(hparams)}}, self.config)
            except SystemExit:
                sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
                raise
        after = self.config[sub].get("model")
        conflicts = [f"--model.{k} {before[k]!r} (checkpoint: {_plain(_get(after, k))!r})" for k in before
                     if _plain(_get(after, k)) != before[k]]
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
        name = ".".join(parts)  # nested ones (conversion.include, rule.init_args.prox_lambda) keep their path
        if parts[0] and parts[0] not in ("backbone", "optimizer", "lr_scheduler") and name not in names:
            names.append(name)
    return names


def _get(config: Any, dotted: str) -> Any:
    """``config[dotted]`` for a jsonargparse Namespace or a nested dict (None when absent)."""
    value = config
    for part in dotted.split("."):
        if hasattr(value, "as_dict"):
            value = value.as_dict()
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


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
