"""The command table: each `blip3o` command declares its words, flags, refusals and function in one `Command`.

    table = CommandTable(description, epilog)
    table.add(Command(("generate",), "generate images from text prompts", run_generate, flags=(...)))
    table.add_group("eval", "evaluate a model")                    # a word that takes a target ...
    table.add(Command(("eval", "shapes"), "...", run_eval_shapes))  # ... which another module adds
    table.add_group(("eval", "score"), "score a benchmark")          # a group inside a group ...
    table.add(Command(("eval", "score", "mme"), "...", run_mme))     # ... is three words on the command line
    args = table.parse(argv)  # argparse's namespace; args.command is the Command to run

Options reach argparse with the default SUPPRESS, so that `parse` sees which ones the user typed;
it fills in the declared defaults afterwards. A typed flag that the rest of the command line makes
meaningless is refused (`Refusal`), never ignored: usage errors all exit 2 from `parse`.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Formatter = argparse.RawDescriptionHelpFormatter  # epilogs hold hand-laid examples


@dataclass(frozen=True)
class Flag:
    """One argument of a command: `names` and `options` are what argparse's add_argument takes."""

    names: tuple[str, ...]  # ("--out",) for an option, ("prompt",) for a positional
    options: dict[str, Any]

    @property
    def is_option(self) -> bool:
        return self.names[0].startswith("-")

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments that holds it."""
        if "dest" in self.options:
            return self.options["dest"]
        long = next((name for name in self.names if name.startswith("--")), self.names[0])
        return long.lstrip("-").replace("-", "_")

    @property
    def shown(self) -> str:
        """How messages name it: `--out`, or `PROMPT` for a positional."""
        return self.names[-1] if self.is_option else self.options.get("metavar", self.dest.upper())

    def default(self) -> Any:
        """The value of an option not typed (a fresh copy: lists are never shared between runs)."""
        if "default" in self.options:
            return copy.copy(self.options["default"])
        return False if self.options.get("action") == "store_true" else None


def flag(*names: str, **options: Any) -> Flag:
    """`flag("--seed", type=int, default=0, help=...)`: add_argument's arguments, kept for the table."""
    return Flag(names, options)


@dataclass(frozen=True)
class Refusal:
    """Flags that mean nothing where `applies(args)` holds: typed anyway, they are refused, not ignored."""

    flags: tuple[str, ...]  # their dests
    applies: Callable[[argparse.Namespace], bool]  # sees every flag, typed or default
    reason: str  # completes "FLAG ...", e.g. "applies to --questions-file only"


@dataclass(frozen=True)
class Command:
    """One `blip3o` command."""

    words: tuple[str, ...]  # ("generate",), or its groups and its target: ("eval", "shapes")
    help: str  # one line: in `blip3o --help` and atop `blip3o COMMAND --help`
    run: Callable[[argparse.Namespace], int]  # does the work; returns the exit code
    flags: tuple[Flag, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    epilog: str = ""  # layouts and examples, after the flags in `--help`
    usage: str | None = None  # the usage line, where argparse's cannot say it (None: argparse's own)
    # for a command whose settings all come from a file: what to say of any option it does not declare
    other_options: str = ""

    @property
    def name(self) -> str:
        return " ".join(self.words)


@dataclass
class CommandTable:
    """Every command of `blip3o`, in the order `blip3o --help` lists them."""

    description: str
    epilog: str
    groups: dict[tuple[str, ...], str] = field(default_factory=dict)  # words -> help, for words that take a target
    commands: dict[tuple[str, ...], Command] = field(default_factory=dict)
    entries: list[tuple[str, ...]] = field(default_factory=list)  # groups and commands, in the order they were added

    def add_group(self, words: str | tuple[str, ...], help_: str) -> None:
        """`words` take a target (`blip3o eval shapes`): a command or a group added later. A group inside a
        group is a tuple of words (`("eval", "score")` for `blip3o eval score mme`)."""
        words = (words,) if isinstance(words, str) else tuple(words)
        self._claim(words)
        self.groups[words] = help_

    def add(self, command: Command) -> None:
        if command.words in self.commands:
            raise ValueError(f"command `{command.name}` is added twice")
        self._claim(command.words)
        self.commands[command.words] = command

    def _claim(self, words: tuple[str, ...]) -> None:
        name = " ".join(words)
        if words in self.entries:
            raise ValueError(f"`blip3o {name}` is added twice")
        if len(words) > 1 and words[:-1] not in self.groups:
            raise ValueError(f"`blip3o {name}`: a target needs a group added first (add_group)")
        self.entries.append(words)

    def build_parser(self) -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], argparse.ArgumentParser]]:
        """The top parser, and each command's own parser (for its usage errors)."""
        parser = argparse.ArgumentParser(prog="blip3o", description=self.description, epilog=self.epilog,
                                         formatter_class=Formatter)
        leaves: dict[tuple[str, ...], argparse.ArgumentParser] = {}
        self._add_targets(parser, (), leaves)
        return parser, leaves

    def _add_targets(self, parser: argparse.ArgumentParser, group: tuple[str, ...],
                     leaves: dict[tuple[str, ...], argparse.ArgumentParser]) -> None:
        """The commands and groups right under `group` (() for the top) as `parser`'s subcommands; each
        command's parser goes into `leaves`."""
        sub = parser.add_subparsers(required=True, **({} if group else {"metavar": "COMMAND"}))
        for words in self._targets(group):
            if words in self.commands:
                leaves[words] = _add_command(sub, self.commands[words])
            else:
                inner = sub.add_parser(words[-1], help=self.groups[words], description=self.groups[words])
                self._add_targets(inner, words, leaves)

    def _targets(self, group: tuple[str, ...]) -> list[tuple[str, ...]]:
        """What sits right under `group`, in the order added; a group with no command inside is left out."""
        def holds_a_command(words: tuple[str, ...]) -> bool:
            return any(command[:len(words)] == words for command in self.commands)

        return [words for words in self.entries if words[:-1] == group and holds_a_command(words)]

    def parse(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """Parsed arguments with every flag's value; usage errors (refusals included) exit 2 via SystemExit."""
        parser, leaves = self.build_parser()
        args, extras = parser.parse_known_args(argv)
        command: Command = args.command
        leaf = leaves[command.words]
        if extras:
            if command.other_options and extras[0].startswith("-"):
                leaf.error(f"{extras[0]}: {command.other_options}")
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        typed = {f.dest for f in command.flags if _typed(f, args)}
        for f in command.flags:
            if not hasattr(args, f.dest):
                setattr(args, f.dest, f.default())
        for refusal in command.refusals:
            refused = [f for f in command.flags if f.dest in refusal.flags and f.dest in typed]
            if refused and refusal.applies(args):
                leaf.error(f"{refused[0].shown} {refusal.reason}")
        return args


def _add_command(subparsers, command: Command) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(command.words[-1], help=command.help, description=command.help,
                                   epilog=command.epilog, usage=command.usage, formatter_class=Formatter)
    for f in command.flags:
        options = {**f.options, "default": argparse.SUPPRESS} if f.is_option else f.options
        parser.add_argument(*f.names, **options)
    parser.set_defaults(command=command)
    return parser


def _typed(f: Flag, args: argparse.Namespace) -> bool:
    if f.is_option:
        return hasattr(args, f.dest)  # SUPPRESS: only a typed option sets its attribute
    return getattr(args, f.dest, None) not in (None, [], "")
