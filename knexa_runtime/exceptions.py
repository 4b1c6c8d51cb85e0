"""Exception-group unwrapping for the CLIs: trio nurseries wrap a single failure in a group."""

from __future__ import annotations

__all__ = ["leaf_of"]


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
