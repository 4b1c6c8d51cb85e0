"""Exception-group unwrapping for the CLIs: trio nurseries wrap a single failure in a group."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

__all__ = ["leaf_of", "run_mapped"]


def leaf_of(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `types` inside (possibly nested) exception groups, else None."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = leaf_of(inner, types)
            if found is not None:
                return found
    return None


def run_mapped(main: Callable[[], None], known: Mapping[type[BaseException], int], prog: str) -> int:
    """Run a daemon's `main`; a known failure (even inside exception groups) becomes one line on
    stderr and its exit code, anything else propagates with its traceback. Ctrl-C exits 0."""
    try:
        main()
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        leaf = leaf_of(exc, tuple(known))
        if leaf is None:
            raise
        print(f"{prog}: {leaf}", file=sys.stderr)
        return next(int(code) for typ, code in known.items() if isinstance(leaf, typ))
    return 0
