"""``gsm-lightning`` command line: LightningCLI over :class:`GSMModule` and any LightningDataModule.

    gsm-lightning fit --config configs/quickstart.yaml
    gsm-lightning test --config configs/quickstart.yaml --ckpt_path path/to.ckpt
    python -m gsm_lightning fit --config ...

``gsm-lightning fit --help`` is kept short (:class:`GSMArgumentParser`, :class:`GSMHelpFormatter`): a two-line
usage, the GSMModule options in groups with their defaults, the common Trainer options in one sentence each, and no
list of every ``nn.Module`` subclass for the backbone.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .core.conversion_spec import Conversion
from .io.checkpoint import read_torch_file
from .learn.rules import build_rule
from .learn.schedules import SigmaSchedule
from .learn.switch import PhaseSwitch
from .training.legacy import migrate_hparams
from .training.module import GSMModule

__all__ = ["GSMArgumentParser", "GSMHelpFormatter", "GSMLightningCLI", "build_cli", "main"]

# The GSMModule options in ``--help``, by group (title, first names after ``--model.``).  A name in none of them
# (a new argument) is shown in a last group, never dropped.
MODEL_HELP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model: backbone and task", ("backbone", "task", "num_classes", "label_smoothing", "distillation")),
    ("model: structure under the FLOPs budget", ("budget", "conversion", "rule", "sigma", "phase1_epochs", "switch")),
    ("model: optimization", ("optimizer", "lr_scheduler", "warmup_epochs")),
)

# The Trainer options that ``--help`` describes; the others (and any a later Lightning adds) are named in one
# paragraph.  All of them parse, and ``--print_config`` shows all of them.
TRAINER_HELP_OPTIONS: tuple[str, ...] = (
    "accelerator", "strategy", "devices", "precision", "logger", "callbacks", "fast_dev_run", "max_epochs",
    "max_steps", "limit_train_batches", "limit_val_batches", "val_check_interval", "log_every_n_steps",
    "enable_checkpointing", "enable_progress_bar", "accumulate_grad_batches", "gradient_clip_val", "deterministic",
    "default_root_dir",
)

# What ``null`` means for the GSMModule options whose default is null: the object GSMModule builds (its defaults).
_NULL_MEANS: dict[str, Callable[[], Any]] = {
    "model.conversion": Conversion,
    "model.rule": lambda: build_rule(None),
    "model.sigma": SigmaSchedule,
    "model.switch": PhaseSwitch,
}

# Lists of known subclasses longer than this are left out of the help (``nn.Module`` has hundreds).
_MAX_LISTED_SUBCLASSES = 3
_CLASS_PATH_EXAMPLES = {"model.backbone": "torchvision.models.resnet18"}
_HELP_USAGE = ("%(prog)s [-h] [-c CONFIG] [--print_config[=flags]]\n"
               "    [--trainer.* ...] --model.backbone BACKBONE [--model.* ...] [--data ...] [...]")
_TRAINER_DOCS = "https://lightning.ai/docs/pytorch/stable/common/trainer.html"
_HELP_EPILOG = ("An option X that takes a class (class_path + init_args) has --X.help CLASS_PATH, which lists that "
                "class's arguments, e.g. --model.rule.help BudgetRule.")


class GSMHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter with shorter entries.

    Lightning's options (all but ``--model.*``) keep the first sentence of their text; the GSMModule options whose
    default is ``null`` say which object that builds; a list of more than ``_MAX_LISTED_SUBCLASSES`` known
    subclasses becomes a note on ``class_path``; the ``--X.help`` options are listed without text (the epilog of
    :class:`GSMArgumentParser` explains them once).  Types and defaults are jsonargparse's."""

    def _format_action(self, action: Any) -> str:
        if action.dest.endswith(".help") and action.help:
            action = copy.copy(action)  # the parser's action keeps its text
            action.help = ""
        return super()._format_action(action)

    def _get_help_string(self, action: Any) -> str:
        extra_help = getattr(action, "extra_help", None)
        if not isinstance(action.help, str) or not callable(extra_help):  # not a typed option (config, print_config)
            return super()._get_help_string(action)
        text = action.help
        if action.dest != "model" and not action.dest.startswith("model."):
            text = _first_sentence(text)
        if action.dest in _NULL_MEANS:
            text = f"{text} ``null``: {_NULL_MEANS[action.dest]()!r}."
        extra = extra_help()  # "" or ", known subclasses: a, b, ..."
        if extra.partition("known subclasses: ")[2].count(", ") >= _MAX_LISTED_SUBCLASSES:
            example = _CLASS_PATH_EXAMPLES.get(action.dest)
            extra = ", class_path: any importable subclass" + (
                f" or function returning one, e.g. {example}" if example else "")
        shown = copy.copy(action)
        shown.help = text
        shown.extra_help = lambda: extra
        return super()._get_help_string(shown)


class GSMArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose help of a subcommand (``gsm-lightning fit --help``) is short: a two-line usage
    instead of every option, the GSMModule options in the groups of ``MODEL_HELP_GROUPS``, the Trainer options of
    ``TRAINER_HELP_OPTIONS`` described (the others named) and the entries of :class:`GSMHelpFormatter`.

    Only this help changes: parsing, ``--print_config``, errors (and their usage line) and the help of a class
    (``--model.backbone.help CLASS_PATH``) are LightningArgumentParser's."""

    def format_help(self, *args: Any, **kwargs: Any) -> str:
        if "model" not in (self.groups or {}):  # the main parser (subcommands): unchanged
            return super().format_help(*args, **kwargs)
        saved = self.usage, self._action_groups, self.epilog, self.formatter_class
        self.usage, self._action_groups, self.epilog = _HELP_USAGE, _help_groups(self), _HELP_EPILOG
        self.formatter_class = GSMHelpFormatter
        try:
            return super().format_help(*args, **kwargs)
        finally:
            self.usage, self._action_groups, self.epilog, self.formatter_class = saved


def _first_sentence(text: str) -> str:
    """The first sentence of a docstring text that is not only a default (``Defaults to ``None``.``): to the first
    period that a space and a capital or a code span follow."""
    sentences = re.split(r"(?<=\.) (?=[A-Z`:])", " ".join(text.split()))
    return next((s for s in sentences if not re.match(r"Defaults? ?(to |:)", s)), sentences[0])


def _help_groups(parser: Any) -> list[Any]:
    """The parser's argument groups for its help (display copies; the parser's groups are left as they are): the
    model group split into ``MODEL_HELP_GROUPS`` (plus a group for any other model option), and the Trainer group
    with the options of ``TRAINER_HELP_OPTIONS``, the others named in its description."""
    groups = parser.groups or {}
    model_group, trainer_group = groups["model"], groups.get("trainer")
    title_of = {name: title for title, names in MODEL_HELP_GROUPS for name in names}
    sections: dict[str, list[Any]] = {title: [] for title, _ in MODEL_HELP_GROUPS}
    sections["model: other"] = []
    for action in model_group._group_actions:
        name = action.dest.split(".")[1] if "." in action.dest else MODEL_HELP_GROUPS[0][1][0]  # --model CONFIG
        sections[title_of.get(name, "model: other")].append(action)
    shown: list[Any] = []
    for group in parser._action_groups:
        if group is model_group:
            shown += [SimpleNamespace(title=f"{title} (GSMModule)", description=None, _group_actions=actions)
                      for title, actions in sections.items() if actions]
        elif group is trainer_group:
            described, others = [], []
            for action in group._group_actions:
                name = action.dest.split(".")[1] if "." in action.dest else None  # None: --trainer CONFIG
                (described if name is None or name in TRAINER_HELP_OPTIONS else others).append(action)
            named = ", ".join(a.dest.split(".", 1)[1] for a in others if not a.dest.endswith(".help"))
            description = f"The full text of each: {_TRAINER_DOCS}." + (
                f" Also accepted, as --trainer.NAME: {named}." if named else "")
            shown.append(SimpleNamespace(title=group.title, description=description, _group_actions=described))
        else:
            shown.append(group)
    return shown


class GSMLightningCLI(LightningCLI):
    """LightningCLI over :class:`GSMModule` (``model:``) and any LightningDataModule (``data:`` with ``class_path``).

    With ``--ckpt_path`` the checkpoint's model hyperparameters replace the config's (the structure, budget and
    layers are the checkpoint's).  An explicit ``--model.<name>`` flag that the checkpoint would override with
    another value is an error naming the flag, never silently ignored.

    Its parsers are :class:`GSMArgumentParser` (a short ``--help``) unless ``parser_class`` says otherwise."""

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = GSMArgumentParser,
                 **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

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
