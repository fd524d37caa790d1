"""What `python -m ftlab --help` and `python -m ftlab fit --help` show: every subcommand with a line each,
`--version`, whole group titles, and the options that LightningCLI's help leaves behind `--X.help CLASS`
(`model.optim` fields and the options of each data class)."""

from __future__ import annotations

import inspect

# (name, one line): every subcommand of `python -m ftlab`
SUBCOMMANDS = [
    ("fit", "train (then test on the test split and export): --config FILE.yaml, overrides as --trainer.max_epochs 2"),
    ("validate", "evaluate a checkpoint on the validation split (--ckpt_path)"),
    ("test", "evaluate a checkpoint on the test split (--ckpt_path)"),
    ("predict", "write the model's predictions to <run dir>/predictions.jsonl (--ckpt_path)"),
    ("generate", "try the result: a prompt or a chat (causal LM), label and scores, or entities (--run DIR)"),
    ("export", "export any checkpoint of a run to the Hugging Face format, no Trainer needed (--run DIR)"),
    ("compare", "freeze vs adapter vs full (or any variants) on one task, the same budget, several seeds"),
    ("estimate", "per-device memory and speed of a fit config, before you ask for GPUs"),
    ("prepare", "tokenise a fit config's data into the cache fit reads, on every core, without model weights"),
    ("slurm submit", "check a fit config and queue it as a Slurm job of N nodes x G GPUs"),
    ("slurm render", "print the Slurm batch script that `slurm submit` would queue"),
]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    import ftlab

    try:
        return package_version("ftlab")
    except PackageNotFoundError:
        return ftlab.__version__


def top_level_help() -> str:
    width = max(len(name) for name, _ in SUBCOMMANDS) + 2
    lines = [
        "usage: python -m ftlab [-h] [--version] SUBCOMMAND [--verbose] [options]",
        "",
        "Fine-tune a pretrained Hugging Face model with PyTorch Lightning: Freeze, Adapter (peft) or Full,",
        "one config switch (model.policy).",
        "",
        "subcommands:",
        *(f"  {name:<{width}}{line}" for name, line in SUBCOMMANDS),
        "",
        "options:",
        "  -h, --help    show this help and exit; `python -m ftlab SUBCOMMAND --help` shows a subcommand's options",
        "  --version     print ftlab's version and exit",
        "  --verbose     (any subcommand) show the libraries' full console output: Lightning's banners and model",
        "                summary, datasets' and transformers' progress bars and load reports, every warning",
        "",
        "example: python -m ftlab fit --config configs/quickstart.yaml",
    ]
    return "\n".join(lines) + "\n"


def first_paragraph(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def attribute_docs(cls) -> dict[str, str]:
    """The docstrings under a dataclass's fields (`lr: float = 5e-5` then `\"\"\"Peak learning rate\"\"\"`)."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _section(parser, title: str, description: str | None, actions) -> str:
    formatter = parser._get_formatter()
    formatter.start_section(title.rstrip("."))
    if description:
        formatter.add_text(description)
    formatter.add_arguments(actions)
    formatter.end_section()
    return formatter.format_help()


def _options(cls, prefix: str, skip: set[str] = frozenset()):
    """jsonargparse's documented options of a class's __init__ (or dataclass fields), under `prefix`."""
    from jsonargparse import ArgumentParser

    sub = ArgumentParser(exit_on_error=False)
    sub.add_class_arguments(cls, prefix, fail_untyped=False)
    actions = [a for a in sub._actions if a.option_strings and a.dest.startswith(prefix + ".")
               and a.dest not in skip and not a.dest.endswith(".help") and a.help != "==SUPPRESS=="]
    return sub, actions


def extra_help(parser) -> str:
    """model.optim fields and every data class's options, formatted like the rest of the help."""
    from ftlab.data import TextDataModule
    from ftlab.optim import Optim

    parts = []
    _, optim = _options(Optim, "model.optim")
    docs = attribute_docs(Optim)
    for action in optim:
        if not action.help or action.help.startswith("("):
            action.help = docs.get(action.dest.rsplit(".", 1)[-1], action.help)
    parts.append(_section(parser, "model.optim: " + first_paragraph(Optim),
                          "Set in the config under model.optim, or as --model.optim.lr 1e-4.", optim))
    linked = {"data.tokenizer", "data.trust_remote_code", "data.gguf_file"}  # set from model.* (see above)
    _, shared = _options(TextDataModule, "data", linked)
    seen = {a.dest for a in shared} | linked
    parts.append(_section(parser, "data (every data class): " + first_paragraph(TextDataModule),
                          "Set under data.init_args in the config, or as --data.batch_size 16 after "
                          "--data CLASS (or a --config naming data.class_path).", shared))
    for cls in sorted(_subclasses(TextDataModule), key=lambda c: c.__name__):
        _, own = _options(cls, "data", seen)
        if own:
            parts.append(_section(parser, f"data: {cls.__name__}: {first_paragraph(cls)}", None, own))
    return "".join(parts)


def _subclasses(cls) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("ftlab."):
            out.append(sub)
        out.extend(_subclasses(sub))
    return out


def document_fit_parser(parser) -> None:
    """Whole group titles, and model.optim and the data options in the subcommand's --help."""
    from ftlab.checkpoints import AtomicCheckpoint

    group = getattr(parser, "groups", {}).get("checkpoint")
    if group is not None:  # docstring_parser takes the first line only, cutting the sentence
        group.title = first_paragraph(AtomicCheckpoint).split(". ")[0]
    parser.epilog = None
    base = parser.format_help

    def format_help() -> str:
        text = base()
        verbose = ("\n--verbose (any subcommand): show the libraries' full console output (Lightning's banners "
                   "and model summary, datasets' and transformers' bars and reports, every warning).\n")
        return text + "\n" + extra_help(parser) + verbose

    parser.format_help = format_help
