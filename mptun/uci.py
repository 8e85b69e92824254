"""A parser for OpenWrt's UCI configuration files (/etc/config/*), so mptun reads its own config.

The grammar follows libuci's `file.c` (openwrt/uci), the reference the router itself uses:

- a line holds commands: `package NAME`, `config TYPE [NAME]`, `option NAME VALUE`,
  `list NAME VALUE` (also abbreviated `p`, `c`, `o`, `l`); `;` separates commands on one line;
- a word is unquoted, '...' (taken literally, may span lines) or "..." (a backslash keeps the
  next character literally, may span lines); adjacent parts join: 'it'\\''s' is `it's`;
- outside quotes `#` starts a comment and a backslash at the end of a line continues it;
- section and option names are [A-Za-z0-9_]; a named section seen again is reopened (its type
  must match); `option` replaces, `list` appends (turning an earlier `option` into a list's first
  item, as libuci does); an empty value removes the option, as `uci set x=''` does.

Errors are `UciError`s saying `file:line: what`, never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mptun.common.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9_]+")
# libuci's uci_validate_type: any printable, non-space ASCII.
TYPE_RE = re.compile(r"[!-~]+")
COMMANDS = {
    "package": "package",
    "p": "package",
    "config": "config",
    "c": "config",
    "option": "option",
    "o": "option",
    "list": "list",
    "l": "list",
}
TRUE_WORDS = frozenset({"1", "yes", "on", "true", "enabled"})
FALSE_WORDS = frozenset({"0", "no", "off", "false", "disabled"})


class UciError(ConfigError):
    """A UCI file that cannot be read or does not parse; the message starts with `file:line:`."""


@dataclass
class UciOption:
    """One option of a section: a single value (`option`) or several (`list`)."""

    name: str
    values: list[str]
    is_list: bool
    line: int

    @property
    def value(self) -> str:
        """The option's value; for a list, its items joined by spaces (as `uci get` prints)."""
        return " ".join(self.values)


@dataclass
class UciSection:
    """A `config TYPE [NAME]` block; `name` is None for an anonymous section."""

    type: str
    name: str | None
    line: int
    index: int  # position among the sections of its type, for the @type[N] notation
    options: dict[str, UciOption] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How `uci show` names the section: its name, or @type[N] when anonymous."""
        return self.name if self.name is not None else f"@{self.type}[{self.index}]"

    def get(self, name: str, default: str | None = None) -> str | None:
        opt = self.options.get(name)
        return opt.value if opt is not None else default

    def get_list(self, name: str) -> list[str]:
        opt = self.options.get(name)
        return list(opt.values) if opt is not None else []

    def get_bool(self, name: str, default: bool) -> bool:
        """A UCI boolean (1/0, yes/no, on/off, true/false, ...), like config_get_bool."""
        opt = self.options.get(name)
        if opt is None:
            return default
        return parse_bool(opt.value, opt.name)

    @property
    def enabled(self) -> bool:
        """OpenWrt convention: `option enabled '0'` (or `disabled '1'`) switches a section off."""
        return self.get_bool("enabled", True) and not self.get_bool("disabled", False)


@dataclass
class UciPackage:
    """A parsed UCI file: its sections in file order."""

    path: str
    sections: list[UciSection] = field(default_factory=list)

    def of_type(self, type_: str) -> list[UciSection]:
        return [s for s in self.sections if s.type == type_]

    def section(self, name: str) -> UciSection | None:
        return next((s for s in self.sections if s.name == name), None)


def parse_bool(text: str, what: str) -> bool:
    """UCI's boolean words; anything else is an error naming `what`."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{what}: {text!r} is not a boolean (use 1 or 0)")


class _Tokenizer:
    """Splits the text into commands of words, following libuci's `parse_str` rules.

    Holds the current line and a cursor, so a quoted string or a backslash continuation can pull
    in the next line (libuci's `uci_getln` from inside the word).
    """

    def __init__(self, text: str, path: str) -> None:
        self._lines = text.splitlines(keepends=True)
        self.path = path
        self.number = 0  # 1-based number of the current line
        self.text = ""
        self.pos = 0

    def error(self, line: int, what: str) -> UciError:
        return UciError(f"{self.path}:{line}: {what}")

    def _next_line(self) -> bool:
        if self.number >= len(self._lines):
            return False
        self.number += 1
        self.text = self._lines[self.number - 1]
        self.pos = 0
        return True

    def _at_line_end(self) -> bool:
        """True on a backslash that ends the line (a continuation)."""
        rest = self.text[self.pos + 1 :]
        return rest in ("", "\n", "\r\n")

    def commands(self) -> Iterator[tuple[int, list[str]]]:
        """Yield (line number, words) per command; `;` and line ends separate commands."""
        while self._next_line():
            start = self.number
            words: list[str] = []
            while True:
                word = self._word()
                if word is not None:
                    words.append(word)
                    continue
                if self.pos < len(self.text) and self.text[self.pos] == ";":
                    self.pos += 1
                    if words:
                        yield start, words
                    words, start = [], self.number
                    continue
                break  # end of line or a comment
            if words:
                yield start, words

    def _word(self) -> str | None:
        """The next word, or None where the command ends (line end, `#` or `;`)."""
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\f\v":
            self.pos += 1
        if self.pos >= len(self.text) or self.text[self.pos] in "\n#;":
            return None
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in "'\"":
                self._quoted(c, out)
            elif c == "\\":
                if self._at_line_end():
                    if not self._next_line():
                        break
                    if not out:  # the continuation came between words
                        return self._word()
                    continue
                out.append(self.text[self.pos + 1])
                self.pos += 2
            elif c in " \t\r\n\f\v#;":
                break
            else:
                out.append(c)
                self.pos += 1
        return "".join(out)

    def _quoted(self, quote: str, out: list[str]) -> None:
        """Consume a quoted part (cursor on its opening quote) into `out`; may span lines."""
        opened = self.number
        self.pos += 1
        while True:
            if self.pos >= len(self.text):
                if not self._next_line():
                    raise self.error(opened, f"unterminated {quote} (end of file reached)")
                continue
            c = self.text[self.pos]
            if c == quote:
                self.pos += 1
                return
            if quote == '"' and c == "\\":
                if self._at_line_end():  # backslash-newline inside "...": joins the lines
                    if not self._next_line():
                        raise self.error(opened, f"unterminated {quote} (end of file reached)")
                    continue
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            out.append(c)
            self.pos += 1


def parses(text: str, path: str = "<uci>") -> UciPackage:
    """Parse UCI text; `path` names it in error messages."""
    pkg = UciPackage(path)
    tok = _Tokenizer(text, path)
    current: UciSection | None = None
    by_name: dict[str, UciSection] = {}
    counts: dict[str, int] = {}
    for line, words in tok.commands():
        cmd = COMMANDS.get(words[0])
        if cmd is None:
            raise tok.error(
                line, f"unknown command {words[0]!r} (expected config, option, list or package)"
            )
        args = words[1:]
        if cmd == "package":
            _arity(tok, line, cmd, args, 1, 1)
            continue
        if cmd == "config":
            _arity(tok, line, cmd, args, 1, 2)
            type_ = args[0]
            if not TYPE_RE.fullmatch(type_):
                raise tok.error(line, f"invalid section type {type_!r}")
            name = args[1] if len(args) > 1 and args[1] != "" else None
            if name is not None and not NAME_RE.fullmatch(name):
                raise tok.error(line, f"invalid section name {name!r} (letters, digits and _ only)")
            if name is not None and name in by_name:
                current = by_name[name]
                if current.type != type_:
                    raise tok.error(
                        line,
                        f"section {name!r} reopened as type {type_!r}; it was {current.type!r} "
                        f"at line {current.line}",
                    )
                continue
            current = UciSection(type_, name, line, counts.get(type_, 0))
            counts[type_] = current.index + 1
            pkg.sections.append(current)
            if name is not None:
                by_name[name] = current
            continue
        # option / list
        if current is None:
            raise tok.error(line, f"{cmd} before the first 'config' line")
        _arity(tok, line, cmd, args, 1, 2)
        name = args[0]
        if not NAME_RE.fullmatch(name):
            raise tok.error(line, f"invalid option name {name!r} (letters, digits and _ only)")
        value = args[1] if len(args) > 1 else ""
        existing = current.options.get(name)
        if cmd == "option":
            if value == "":
                current.options.pop(name, None)
            else:
                current.options[name] = UciOption(name, [value], False, line)
        elif existing is None:
            current.options[name] = UciOption(name, [value], True, line)
        else:
            existing.values.append(value)
            existing.is_list = True
            existing.line = line
    return pkg


def _arity(tok: _Tokenizer, line: int, cmd: str, args: list[str], lo: int, hi: int) -> None:
    if len(args) < lo:
        what = {"package": "a name", "config": "a type"}.get(cmd, "a name")
        raise tok.error(line, f"{cmd} needs {what}")
    if len(args) > hi:
        extra = " ".join(repr(a) for a in args[hi:])
        raise tok.error(line, f"too many arguments to {cmd}: {extra} (quote values with spaces)")


def load(path: str | Path) -> UciPackage:
    """Read and parse a UCI file; unreadable files are a one-line UciError too."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UciError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise UciError(f"{p}: is a directory") from None
    except UnicodeDecodeError:
        raise UciError(f"{p}: not UTF-8 text") from None
    except OSError as e:
        raise UciError(f"{p}: cannot read: {e.strerror}") from None
    return parses(text, str(p))
