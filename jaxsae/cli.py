"""The `jaxsae` command: one subcommand per stage, absl flags, one-line errors.

Flags are defined here only, generated from each stage's frozen config dataclass (written with
`config.field`): a field's `metadata["help"]` is its help text and its default is the flag's
default, so `--help` and the config can never disagree. Library code receives the dataclass and never reads FLAGS.

  jaxsae extract --model=M --sites=S --num_tokens=N --out=DIR
  jaxsae train --store=DIR --arch=topk --seeds=0,1,2,3 --out=RUN
  jaxsae match RUN_OR_SAE_DIRS... --out=DIR
  jaxsae report MATCH_DIR --out=DIR
  jaxsae consensus MATCH_DIR --min_seeds=M --out=DIR
  jaxsae demo
  jaxsae synth --out=DIR [--num_features=N --d_in=D --l0=L ...]
  jaxsae truth RUN_OR_SAE_DIRS... --truth=DIR/truth --out=DIR
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
import typing
from typing import Any

from absl import app
from absl import flags
from absl import logging as absl_logging

from jaxsae.errors import JaxsaeError


# name -> (module, config class, one-line description). Modules import lazily so that one
# subcommand never pays for another's dependencies (torch for extract, jax for the rest).
COMMANDS = {
    "extract": ("jaxsae.extract", "ExtractConfig", "run the LM once and store activations"),
    "train": ("jaxsae.train", "TrainConfig", "train S SAE seeds at once on a store"),
    "match": ("jaxsae.match", "MatchConfig", "match every pair of seeds; what is shared"),
    "report": ("jaxsae.report", "ReportConfig", "plots, JSON and an HTML page from a match"),
    "consensus": ("jaxsae.consensus", "ConsensusConfig", "one SAE of the features found in M "
                  "of S seeds (1: the union)"),
    "demo": ("jaxsae.demo", "DemoConfig", "the whole pipeline on the offline default"),
    "synth": ("jaxsae.synthetic", "SynthConfig", "write a store of known features and its truth"),
    "truth": ("jaxsae.truth", "TruthConfig", "how much of a known dictionary SAEs recover"),
}


def _base_type(tp: Any) -> tuple[Any, bool]:
  """(type, optional) for `X` or `X | None`."""
  args = typing.get_args(tp)
  if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
    (inner,) = [a for a in args if a is not type(None)]
    return inner, True
  return tp, False


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
  hints = typing.get_type_hints(cls)
  return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field) -> Any:
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  return None


def define_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of the config dataclass `cls`."""
  for f, tp in _fields(cls):
    if f.metadata.get("positional"):
      continue
    help_ = f.metadata.get("help", "")
    default = _default(f)
    base, _ = _base_type(tp)
    origin = typing.get_origin(base)
    if base is bool:
      flags.DEFINE_bool(f.name, default, help_, flag_values=flag_values)
    elif base is int:
      flags.DEFINE_integer(f.name, default, help_, flag_values=flag_values)
    elif base is float:
      flags.DEFINE_float(f.name, default, help_, flag_values=flag_values)
    elif origin in (tuple, list):
      flags.DEFINE_list(f.name, None if default is None else [str(v) for v in default], help_,
                        flag_values=flag_values)
    else:
      flags.DEFINE_string(f.name, None if default is None else str(default), help_,
                          flag_values=flag_values)


def config_from_flags(cls, positional: list[str], flag_values: flags.FlagValues = flags.FLAGS):
  """Builds the config dataclass from parsed flags (and positional arguments)."""
  kwargs = {}
  for f, tp in _fields(cls):
    if f.metadata.get("positional"):
      kwargs[f.name] = tuple(positional)
      continue
    value = flag_values[f.name].value
    base, _ = _base_type(tp)
    if typing.get_origin(base) in (tuple, list) and value is not None:
      (elem, *_) = typing.get_args(base) or (str,)
      try:
        value = tuple(elem(v) for v in value)
      except ValueError:
        raise JaxsaeError(f"--{f.name}={','.join(value)}: every item must be {elem.__name__}")
    kwargs[f.name] = value
  if positional and not any(f.metadata.get("positional") for f, _ in _fields(cls)):
    raise JaxsaeError(f"unexpected arguments {' '.join(positional)}; flags look like --name=value")
  return cls(**kwargs)


def describe(cls) -> str:
  """Every flag of `cls` with its default and help, for `--help`."""
  lines = []
  for f, _ in _fields(cls):
    name = f.name.upper() if f.metadata.get("positional") else f"--{f.name}"
    default = _default(f)
    if isinstance(default, (tuple, list)):
      default = ",".join(map(str, default))
    shown = "" if f.metadata.get("positional") else f" (default: {default!r})"
    lines.append(f"  {name}{shown}\n      {f.metadata.get('help', '')}")
  return "\n".join(lines)


def _load(command: str):
  module_name, cls_name, _ = COMMANDS[command]
  module = importlib.import_module(module_name)
  return module, getattr(module, cls_name)


def _usage() -> str:
  out = ["usage: jaxsae COMMAND [--flag=value ...] [--flagfile=FILE]", "", "commands:"]
  out += [f"  {name:9s} {desc}" for name, (_, _, desc) in COMMANDS.items()]
  for name in COMMANDS:
    try:
      _, cls = _load(name)
    except ImportError:
      continue  # a stage whose optional dependencies are missing
    out += ["", f"jaxsae {name}:", describe(cls)]
  return "\n".join(out)


def _no_library_tracebacks(record) -> bool:
  """Drops a library's logged traceback: the error reaches jaxsae too, which says it in a line.

  (orbax logs the failure of its writer threads with a traceback, then re-raises it.)
  """
  return not (record.exc_info and "jaxsae" not in record.pathname)


def _quiet_closed_loops(hook):
  """Drops "Event loop is closed" from callbacks of writes orbax abandoned after a failure.

  tensorstore completes them on its own threads after orbax closed their asyncio loop, which
  Python can only report as an unraisable exception; the failure itself is reported as one
  line.
  """
  def quiet(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      hook(unraisable)
  return quiet


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help", "--helpfull"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"jaxsae: unknown command {command!r}; commands: {', '.join(COMMANDS)}",
          file=sys.stderr)
    sys.exit(2)
  module, cls = _load(command)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[2:]):
    print(f"usage: jaxsae {command} [--flag=value ...] [--flagfile=FILE]\n")
    print((module.__doc__ or "").strip() + "\n\nflags:\n" + describe(cls))
    sys.exit(0)
  define_flags(cls)

  def run(args: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
      # absl would print every INFO line of orbax and XLA; progress bars say what matters.
      absl_logging.set_verbosity(absl_logging.WARNING)
      absl_logging.get_absl_handler().addFilter(_no_library_tracebacks)
      sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
    try:
      module.run(config_from_flags(cls, args[1:]))
    except JaxsaeError as e:
      print(f"jaxsae {command}: error: {e}", file=sys.stderr)
      sys.exit(1)
    except OSError as e:  # a full disk, a quota, a permission: the file and the reason
      where = f"{e.filename}: " if e.filename else ""
      print(f"jaxsae {command}: error: {where}{e.strerror or e}; free space or fix the path, "
            "then rerun the same command (it resumes)", file=sys.stderr)
      sys.exit(1)
    except KeyboardInterrupt:
      print(f"\njaxsae {command}: interrupted; rerun the same command to resume",
            file=sys.stderr)
      sys.exit(130)

  try:
    app.run(run, argv=[f"jaxsae {command}"] + argv[2:])
  except SystemExit:
    raise


if __name__ == "__main__":
  main()
