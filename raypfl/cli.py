"""Command-line checks made before Hydra composes: unknown group choices fail with one line, exit code 2."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3  # the run stopped on a fault (no quorum, no living actor); resume from its checkpoint


def group_choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group (its YAML files), or [] if it is not a group."""
    folder = conf_dir / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_group_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """An error message for the first `group=choice` override naming a choice that does not exist."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if "." in group or group.startswith("hydra") or any(ch in value for ch in "()[]{}*$"):
            continue  # plain keys, Hydra's own groups and sweep syntax are left to Hydra
        choices = group_choices(group, conf_dir)
        if not choices:
            continue
        for choice in value.split(","):
            if choice and choice not in choices:
                return f"unknown {group}={choice} (choose from: {', '.join(choices)})"
    return None
