"""`python -m ftlab` / `ftlab`: user errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import sys

from ftlab.errors import ConfigError, did_you_mean


def user_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind an exception, if any. jsonargparse wraps errors raised while it
    instantiates subclass-typed arguments (e.g. `data:`) in its own ValueError; the original stays on
    the exception's context chain."""
    outer, seen = err, 0
    while err is not None and seen < 20:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    last = ConfigError.last
    if last is not None and str(last) in str(outer):  # quoted inside jsonargparse's Union error text
        return last
    return None


def parse_error_line(err: BaseException, argv: list[str] | None = None) -> str | None:
    """jsonargparse's multi-line parse error (wrong type, unknown or missing key) as one line (`argv`: the
    command line, whose --config files a YAML error is looked for in)."""
    import argparse
    import re

    if not isinstance(err, argparse.ArgumentError):
        return None
    text = str(err)
    key = ".".join(re.findall(r'Parser key "([^"]+)"', text))  # nested: model.optim + schedule
    inner = re.search(r"Expected a (.+?)\. Got value: (.*)", text)
    if inner:
        want, value = inner.group(1), inner.group(2).strip()
        literal = re.match(r"typing\.Literal\[(.*)\]$", want)
        want = f"one of {literal.group(1)}" if literal else re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", want)
    else:
        given = re.findall(r"Given value: (.*)", text)
        value = given[-1].strip() if given else None
        kinds = sorted(set(re.findall(r"Expected a <class '(\w+)'>", text)), key=text.find)
        want = " or ".join("None" if k == "NoneType" else k for k in kinds) or "another value"
    nested = re.match(r"NestedArg\(key='([^']*)', val=(.*)\)$", value or "")
    if key and nested:  # an option of a class given by name (`strategy: fsdp`, then --trainer.strategy.X=...)
        option, val = nested.group(1), nested.group(2).strip("'\"")
        name = re.search(r"Expected a dot import path string: (\S+)", text)
        name = name.group(1) if name else None
        form = None
        if key == "trainer.strategy" and name:
            from ftlab.strategies import class_form

            form = class_form(name)
        given = f" ({name!r})" if name else ""
        fix = (f"give its class: {' '.join(form)} --{key}.{option}={val}" if form else
               f"give it as a class path (see --help) before --{key}.{option}")
        return f"{key}.{option}={val}: {key} is given by name{given}, which takes no options; {fix}"
    option = re.search(r"Option '([^']+)' is not accepted", text)
    owner = re.search(r"Problem with given class_path '([\w.]+)'", text)
    if key and option and owner:  # a misspelt key inside a class's mapping (`optim: {learning_rate: ...}`)
        return f"{key}.{option.group(1)}: {owner.group(1).rpartition('.')[2]} has no such option; " \
               f"{did_you_mean(option.group(1), _init_options(owner.group(1)))}"
    if "<unicode string>" in text:  # a YAML syntax error: name the file jsonargparse read it from
        located = _yaml_error_in_configs(sys.argv[1:] if argv is None else argv)
        if located:
            return located
    unknown = re.search(r"Expected a dot import path string: (\S+)", text)
    base = re.search(r"Subtypes: \[<class '([\w.]+)'>", text)
    if key and unknown and base:  # a class given by a name that is none of the known ones
        return f"{key}={unknown.group(1)}: no such class; {did_you_mean(unknown.group(1), _subclass_names(base.group(1)))}"
    if key and value is not None:
        if value == "None":
            return f"{key} is required but not given; set it in the config or as --{key} VALUE"
        return f"{key}={value}: expected {want} (see --help)"
    return " ".join(text.split())[:500] + " (see --help)"


def _init_options(path: str) -> list[str]:
    """The options a class takes (its __init__'s keyword names), for a did-you-mean."""
    import importlib
    import inspect

    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _yaml_error_in_configs(argv: list[str]) -> str | None:
    """The first --config file of the command line that is not valid YAML, with where and why."""
    import yaml

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except OSError:
            continue
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
            return f"--config {where}: not valid YAML ({getattr(err, 'problem', None) or err}); fix the file there"
    return None


def _subclass_names(path: str) -> list[str]:
    """The names a class-typed option takes: the subclasses of `path` (module.Class), at any depth."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        base = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    names, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        if not cls.__name__.startswith("_"):
            names.append(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: the command line)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in ([], ["-h"], ["--help"]):
        from ftlab.help import top_level_help

        print(top_level_help(), end="")
        return 0
    if args == ["--version"]:
        from ftlab.help import version

        print(f"ftlab {version()}")
        return 0
    from ftlab import console

    if "--verbose" in args:  # any subcommand; ranks it launches see FTLAB_VERBOSE
        args = [a for a in args if a != "--verbose"]
        if argv is None:
            sys.argv = [sys.argv[0], *args]
        else:
            argv = args
        console.setup(verbose=True)
    else:
        console.setup()
    try:
        if args[:1] == ["export"]:
            from ftlab.export_cli import main as export_main

            console.quiet_libraries()
            export_main(args[1:])
        elif args[:1] == ["generate"]:
            from ftlab.generate import main as generate_main

            console.quiet_libraries()
            return generate_main(args[1:])
        elif args[:1] == ["compare"]:
            from ftlab.compare.cli import main as compare_main

            return compare_main(args[1:])
        elif args[:1] == ["prepare"]:
            from ftlab.prepare_cli import main as prepare_main

            console.quiet_libraries()
            return prepare_main(args[1:])
        elif args[:1] == ["estimate"]:
            from ftlab.estimate.cli import main as estimate_main

            return estimate_main(args[1:])
        elif args[:1] == ["slurm"]:
            from ftlab.slurm.cli import main as slurm_main

            slurm_main(args[1:])
        else:
            from ftlab.cli import run_cli

            console.quiet_libraries()
            run_cli(argv)
    except SystemExit as err:
        if type(err).__name__ != "SIGTERMException":
            raise
        # Lightning's answer to SIGTERM (scancel, a preemption without USR1, a pod stopped) is a bare
        # SystemExit, exit status 0: `fit && export` would go on, and schedulers count the job a success
        print("ftlab: error: stopped by SIGTERM before the run finished; resume with --ckpt_path last",
              file=sys.stderr)
        return 128 + 15
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a user error
        cause = user_error(err) or parse_error_line(err, args)
        from ftlab.faults import collective_timeout_report

        report = collective_timeout_report(err) if cause is None else None
        if report:
            print(f"ftlab: error: {report}", file=sys.stderr)
            return 1
        if cause is None:
            raise
        print(f"ftlab: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
