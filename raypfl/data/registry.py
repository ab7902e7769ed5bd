"""User code named by `_target_` (a model factory, a dataset function, a partitioner): imported by its dotted
path, its keyword arguments checked against its signature, every failure one ConfigError line naming the key.

The style is the algorithm registry's (`raypfl.algorithms.algorithm_class`): a shipped short name, or
`GROUP._target_: package.module.name` with the callable's keyword arguments as the other keys `GROUP.*`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from raypfl.errors import ConfigError

__all__ = ["accepts", "check_arguments", "locate", "node_dict", "reason"]

#: Keys of a group that are not keyword arguments of its `_target_`: the label and the target itself.
RESERVED = ("name", "_target_")


def reason(exc: BaseException) -> str:
    """An exception as one short line (`ValueError: ...`), cut between words."""
    from raypfl.data.datasets import _reason

    return _reason(exc)


def node_dict(node: Any) -> dict[str, Any]:
    """A config node (DictConfig or mapping) as a plain dict with resolved values."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node or {})


def locate(key: str, target: Any) -> Callable[..., Any]:
    """The callable that `key`=`target` names (`model._target_=pkg.module.make_net`); ConfigError otherwise.

    The longest importable module prefix of the path is imported, the rest are attributes of it, so
    `pkg.module.Class.factory` works too.
    """
    path = str(target).strip() if isinstance(target, str) else ""
    parts = path.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"{key}={target}: not a dotted path package.module.name")
    obj: Any = None
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
            break
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and (module == missing or module.startswith(missing + ".")):
                continue  # this prefix is not a module: a shorter one may be
            raise ConfigError(f"{key}={path}: cannot import it ({reason(exc)})") from None
        except Exception as exc:  # the module itself failed while importing (SyntaxError, ...)
            raise ConfigError(f"{key}={path}: cannot import it (importing {module}: {reason(exc)})") from None
    else:
        raise ConfigError(
            f"{key}={path}: cannot import it (no module named {parts[0]!r}; run from the folder that holds "
            "it, or add that folder to PYTHONPATH)"
        )
    for attr in parts[cut:]:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"{key}={path}: cannot import it ({module} has no {attr!r})") from None
    if not callable(obj):
        raise ConfigError(f"{key}={path} is a {type(obj).__name__}, not a function or class")
    return obj


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: checked when called
        return None


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """True if `fn` has a parameter `name` that can be passed by keyword (not merely through **kwargs)."""
    sig = _signature(fn)
    if sig is None:
        return False
    param = sig.parameters.get(name)
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def check_arguments(
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
    group: str,
    where: str,
    positional: int = 0,
    supplied: Iterable[str] = (),
    expected: str = "",
) -> None:
    """ConfigError unless `fn(*positional args, **supplied, **kwargs)` binds: an unknown key `group.KEY`,
    a key raypfl supplies itself, or a required argument that no key gives.

    `where` names the callable in messages (`model._target_=pkg.make_net`), `positional` is how many
    positional arguments raypfl passes first, `supplied` the keyword arguments it adds (e.g. `in_shape`),
    `expected` how it is called, for the message when it cannot be (`(labels, num_clients, seed, **kwargs)`).
    """
    sig = _signature(fn)
    if sig is None:
        return
    supplied = tuple(supplied)
    for key in kwargs:
        if key in supplied:
            raise ConfigError(f"{group}.{key}: raypfl passes {key} to {where} itself; remove the key")
    params = list(sig.parameters.values())
    named = [
        p.name
        for p in params[positional:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in supplied
    ]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    for key in kwargs:
        if key not in named and not takes_any:
            raise ConfigError(
                f"unknown key {group}.{key} for {where} (its arguments: {', '.join(named) or 'none'})"
            )
    try:
        sig.bind(*([None] * positional), **{k: None for k in (*supplied, *kwargs)})
    except TypeError as exc:
        missing = [
            p.name
            for p in params[positional:]
            if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in kwargs
            and p.name not in supplied
        ]
        if missing:
            raise ConfigError(
                f"{where} needs {', '.join(missing)}: set +{group}.{missing[0]}=VALUE on the command line"
            ) from None
        how = f" as {expected}" if expected else ""
        raise ConfigError(f"{where} cannot be called{how} ({reason(exc)})") from None
