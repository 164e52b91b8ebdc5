"""T5X-style gin command lines: ``--gin_file=...``, ``--gin.NAME=VALUE``, ``--gin_search_paths``.

  prompt-t5x train --gin_file=models/base.gin --gin_file=runs/prompt_tuning.gin \\
      --gin.MODEL_DIR="'/tmp/rte'" --gin.TRAIN_STEPS=1000

gin files are looked up in, in order: the directories of ``--gin_search_paths`` (comma separated),
the current directory, the repository's ``gin/`` directory and a ``gin/`` directory inside the
installed package. ``include`` lines inside gin files use the same paths.

Values: ``--gin.X=VALUE`` takes a gin/Python literal (``3``, ``'text'``, ``[1, 2]``, ``None``,
``@ref()``, ``%MACRO``). A value that is not a literal (``--gin.MODEL_DIR=/tmp/x``) is taken as a
string, since that is what a shell user means; quote it (``"'3'"``) to force a string that looks
like a number.

Every user mistake becomes one ``UsageError`` (exit status 2) naming the thing and the fix: an
unknown configurable or parameter (with the closest names), a gin file not found (with the paths
searched), a macro that is required (``%gin.REQUIRED``) but not set, a macro set on the command
line that no gin file uses.
"""

from __future__ import annotations

import difflib
import inspect
import io
import logging
import os
import pathlib
import re
import tokenize
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import gin

from prompt_t5x.base.errors import UsageError
from prompt_t5x.commands import configurables, gin_checks

# This module lives in prompt_t5x/commands/: the repository's gin/ (a checkout or an editable
# install) is two levels up, the installed copy (setup.py's package_dir) is prompt_t5x/gin.
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_SEARCH_PATHS = (str(_PACKAGE_DIR.parent / "gin"), str(_PACKAGE_DIR / "gin"))
_INCLUDE = re.compile(r"^\s*include\s+['\"]([^'\"]+)['\"]", re.M)
_MACRO_REF = re.compile(r"%([A-Za-z_][A-Za-z0-9_.]*)")
_MACRO_DEF = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=", re.M)


class GinArgs:
    """The gin part of a command line, plus whatever flags were left for the command."""

    def __init__(self):
        self.files: List[str] = []
        self.bindings: List[Tuple[str, str]] = []   # (name, value text)
        self.search_paths: List[str] = []
        self.rest: List[str] = []

    def binding_lines(self) -> List[str]:
        return [f"{name} = {value}" for name, value in self.bindings]


def split_argv(argv: Sequence[str]) -> GinArgs:
    """Separate ``--gin_file``, ``--gin.X=V`` and ``--gin_search_paths`` from other flags."""
    args = GinArgs()
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        for flag, target in (("--gin_file", args.files), ("--gin_search_paths", None)):
            if arg == flag or arg.startswith(flag + "="):
                if arg == flag:
                    if i + 1 >= len(argv):
                        raise UsageError(f"{flag} needs a value, e.g. {flag}=PATH")
                    value = argv[i + 1]
                    i += 1
                else:
                    value = arg[len(flag) + 1:]
                if target is None:
                    args.search_paths += [p for p in value.split(",") if p]
                else:
                    target.append(value)
                break
        else:
            if arg.startswith("--gin."):
                name, sep, value = arg[len("--gin."):].partition("=")
                if not sep or not name:
                    raise UsageError(f"bad binding {arg!r}: write --gin.NAME=VALUE, e.g. "
                                     "--gin.TRAIN_STEPS=1000")
                opened = unclosed_bracket(f"X = {value}")
                if opened is not None and value.strip().startswith(("(", "[", "{")):
                    raise UsageError(f"bad binding {arg!r}: the {opened[1]!r} is never closed; "
                                     f"write a complete value, e.g. --gin.{name}=[1, 2] or "
                                     f"--gin.{name}=4")
                args.bindings.append((name, literal_or_string(value)))
            else:
                args.rest.append(arg)
        i += 1
    return args


def literal_or_string(value: str) -> str:
    """gin text for a command-line value: literals/references as given, anything else quoted."""
    text = value.strip()
    if text.startswith(("@", "%")):
        return text
    try:
        gin.config_parser.ConfigParser(f"X = {text}", gin.config.ParserDelegate(
            skip_unknown=True)).parse_statement()
        return text
    except (SyntaxError, ValueError, TypeError, tokenize.TokenError):
        return repr(value)


def unclosed_bracket(text: str) -> Optional[Tuple[int, str]]:
    """(line, bracket) of the bracket that ``text`` never closes, else None.

    gin reads values with Python's tokenizer, which reports an unclosed bracket only as
    ``TokenError: EOF in multi-line statement`` at the end of the text; the user needs the line
    where the bracket was opened."""
    stack: List[Tuple[int, str]] = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.OP and token.string in "([{":
                stack.append((token.start[0], token.string))
            elif token.type == tokenize.OP and token.string in ")]}" and stack:
                stack.pop()
    except tokenize.TokenError:
        return stack[-1] if stack else (text.count("\n") + 1, "string")
    except (SyntaxError, IndentationError):
        return None
    return None


def search_paths(extra: Iterable[str] = ()) -> List[str]:
    paths = list(extra) + [os.getcwd()] + list(DEFAULT_SEARCH_PATHS)
    seen, out = set(), []
    for p in paths:
        p = os.path.abspath(p)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def find_gin_file(name: str, paths: Sequence[str]) -> str:
    if os.path.isabs(name):
        if os.path.isfile(name):
            return name
    else:
        for base in paths:
            candidate = os.path.join(base, name)
            if os.path.isfile(candidate):
                return candidate
    known = sorted({str(p.relative_to(base)) for base in map(pathlib.Path, paths)
                    if base.is_dir() for p in base.rglob("*.gin")})
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UsageError(f"gin file {name!r} not found (searched: {', '.join(paths)}).{hint}")


def _read_with_includes(path: str, paths: Sequence[str], seen: Dict[str, str]) -> None:
    if path in seen:
        return
    with open(path, encoding="utf-8") as f:
        seen[path] = f.read()
    for include in _INCLUDE.findall(seen[path]):
        try:
            found = find_gin_file(include, [os.path.dirname(path)] + list(paths))
        except UsageError as e:
            raise UsageError(f"{path}: include {include!r}: {e}") from None
        _read_with_includes(found, paths, seen)


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


# ------------------------------------------------------------------------------ errors ----
def _all_names() -> List[str]:
    return sorted(configurables.REGISTERED)


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _params_of(name: str) -> List[str]:
    fn = configurables.REGISTERED.get(name)
    if fn is None:
        short = [k for k in configurables.REGISTERED if k.split(".")[-1] == name]
        fn = configurables.REGISTERED[short[0]] if short else None
    if fn is None:
        return []
    return [p for p in inspect.signature(fn).parameters
            if p not in ("self", "args", "kwargs", "overrides")]


def translate_gin_error(e: BaseException) -> UsageError:
    """A gin parse/bind error -> one UsageError with the closest valid names."""
    text = str(e)
    where = ""
    m = re.search(r"In (?:file \"([^\"]+)\", line (\d+)|bindings string line \d+)\n\s*(.*)",
                  text)
    if m:
        where = f" (at {m.group(1)}:{m.group(2)}: {m.group(3).strip()})" if m.group(1) else (
            f" (in command-line binding: {m.group(3).strip()})")
    m = re.search(r"No configurable matching (?:reference )?'@?([^'(]+)", text)
    if m:
        name = m.group(1)
        return UsageError(f"unknown gin configurable {name!r}{where}.{_suggest(name, _all_names())}"
                          f" Known: {', '.join(_all_names())}.")
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
    if m:
        conf, param = m.groups()
        params = _params_of(conf)
        return UsageError(f"unknown gin binding {conf}.{param}{where}: {conf} has no parameter "
                          f"{param!r}.{_suggest(param, params)}"
                          + (f" Parameters: {', '.join(params)}." if params else ""))
    m = re.search(r"Unable to open file: ([^.\s]+(?:\.[^.\s]+)*)\.", text)
    if m:
        return UsageError(f"gin include {m.group(1)!r} not found{where}.")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return UsageError(f"bad gin configuration{where}: {first}")


# ------------------------------------------------------------------------------- parse ----
# Modules whose import registers gin configurables used by the files in gin/ (TF-free).
# (``evaluate`` / ``infer`` are registered by their command module, not by inference/.)
CONFIGURABLE_MODULES = ["prompt_t5x.commands.configurables", "prompt_t5x.commands.run_train",
                        "prompt_t5x.commands.scaling", "prompt_t5x.commands.evaluate_cmd",
                        "prompt_t5x.commands.compare"]


def register_configurables() -> None:
    import importlib
    for name in CONFIGURABLE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command module not installed/written yet
            if e.name != name:
                raise


def parse(gin_args: GinArgs, *, required_files: bool = True,
          default_files: Sequence[str] = ()) -> Dict[str, str]:
    """Clear gin, parse the files and bindings; return ``{path: text}`` of every file read.

    Raises UsageError for every mistake listed in the module docstring.
    """
    register_configurables()
    files = list(gin_args.files) or list(default_files)
    if required_files and not files:
        raise UsageError("no gin file given: pass --gin_file=runs/prompt_tuning.gin (and a "
                         "model, e.g. --gin_file=models/tiny.gin)")
    paths = search_paths(gin_args.search_paths)
    resolved = [find_gin_file(f, paths) for f in files]
    texts: Dict[str, str] = {}
    for path in resolved:
        _read_with_includes(path, paths, texts)

    gin.clear_config()
    for p in paths:
        gin.add_config_file_search_path(p)
    # gin logs an ERROR for every search path an include is *not* in; we already resolved
    # every include ourselves, so those lines are noise.
    logging.disable(logging.ERROR)
    try:
        for path in resolved:
            gin.add_config_file_search_path(os.path.dirname(path))
        gin.parse_config_files_and_bindings(resolved, gin_args.binding_lines(),
                                            finalize_config=False)
    except tokenize.TokenError:
        raise _unclosed_error(texts) from None
    except (ValueError, SyntaxError, OSError, TypeError) as e:
        raise translate_gin_error(e) from None
    finally:
        logging.disable(logging.NOTSET)
    check_macros(texts, gin_args)
    # Types last: a value's check needs every macro it goes through to be set.
    gin_checks.check_bindings(bindings=[name for name, _ in gin_args.bindings])
    return texts


def _unclosed_error(texts: Dict[str, str]) -> UsageError:
    """The UsageError for gin's TokenError: the file and line whose bracket is never closed
    (command-line bindings were checked in ``split_argv``)."""
    for path, text in texts.items():
        found = unclosed_bracket(text)
        if found is not None:
            line, bracket = found
            return UsageError(f"gin file {path}, line {line}: the {bracket!r} opened there is "
                              "never closed; finish the value or remove the line.")
    return UsageError("bad gin configuration: a value ends inside an unclosed bracket.")


def defined_macros(texts: Dict[str, str], gin_args: GinArgs) -> List[str]:
    names = set()
    for text in texts.values():
        names.update(_MACRO_DEF.findall(_strip_comments(text)))
    names.update(n for n, _ in gin_args.bindings if n.isupper())
    return sorted(names)


def check_macros(texts: Dict[str, str], gin_args: GinArgs) -> None:
    """Every macro referenced must have a value (not ``%gin.REQUIRED``); every macro bound on the
    command line must be used somewhere."""
    referenced = set()
    for text in list(texts.values()) + gin_args.binding_lines():
        referenced.update(n for n in _MACRO_REF.findall(_strip_comments(text))
                          if n != "gin.REQUIRED")
    missing = []
    for name in sorted(referenced):
        try:
            value = gin.query_parameter(f"%{name}")
        except ValueError:
            missing.append(name)
            continue
        if isinstance(value, gin.config.ConfigurableReference) and "gin.REQUIRED" in repr(value):
            missing.append(name)
    if missing:
        flags = " ".join(f"--gin.{n}=..." for n in missing)
        raise UsageError(f"required gin macro(s) not set: {', '.join(missing)}. Pass {flags} "
                         f"(e.g. --gin.MODEL_DIR=\"'/tmp/my_run'\").")
    for name, _ in gin_args.bindings:
        if name.isupper() and name not in referenced:
            used = sorted(referenced)
            raise UsageError(f"--gin.{name} sets a macro that no gin file uses."
                             f"{_suggest(name, used)} Macros of this configuration: "
                             f"{', '.join(used) or 'none'}.")


def call(fn, *args, **kwargs):
    """Call a gin configurable, turning gin's missing-binding errors into UsageError."""
    try:
        return fn(*args, **kwargs)
    except UsageError as e:
        # A configurable's own check: gin appended its "In call to configurable" lines to it.
        raise UsageError(str(e).split("\n  In call to configurable")[0].strip()) from None
    except ValueError as e:
        # Raised while gin builds the configuration objects (a bad size, field, mode, ...):
        # a configuration error. gin appends "In call to configurable ..." lines; drop them.
        text = str(e).split("\n  In call to configurable")[0].strip()
        raise UsageError(f"bad gin configuration: {text}") from None
    except (TypeError, RuntimeError) as e:
        text = str(e)
        m = re.search(r"in scope '([^']+)'", text)
        if "configurable 'macro'" in text and m:
            raise UsageError(f"gin macro {m.group(1)} is used but never set: pass "
                             f"--gin.{m.group(1)}=...") from None
        m = re.search(r"Required bindings for `([^`]+)` not provided in config: \[([^\]]*)\]",
                      text)
        if m:
            names = [n.strip(" '") for n in m.group(2).split(",")]
            binds = " ".join(f"--gin.{m.group(1)}.{n}=..." for n in names)
            raise UsageError(f"{m.group(1)} needs {', '.join(names)}: bind it in a gin file or "
                             f"pass {binds}") from None
        raise


def operative_config() -> str:
    try:
        return gin.config_str()
    except Exception:  # pragma: no cover - gin cannot print some values; never fail a run
        return ""
