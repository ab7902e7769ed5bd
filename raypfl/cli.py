"""Command-line checks made before Hydra composes: unknown group choices and unknown keys fail with one
line, exit code 2 (Hydra's own message is several lines and exits 1)."""

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


#: Command-line flags a key check understands; with any other (--cfg, --config-name, ...) it is left to Hydra.
_RUN_FLAGS = ("-m", "--multirun")


def check_key_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """An error message for the first `key=value` (or `~key`) override of a key the composed config lacks.

    The config is composed with the command line's group choices (a sweep's first choice), as Hydra would;
    `+key=value` (adding a key) and `hydra.*` are left to Hydra and to raypfl.config.validate.
    """
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType
    from omegaconf import DictConfig, OmegaConf

    if any(a.startswith("-") and a not in _RUN_FLAGS for a in args):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # a syntax error: Hydra says where
        return None
    groups, keys, swept = [], [], set()
    for o in overrides:
        name = o.key_or_group
        if name == "hydra" or name.startswith(("hydra.", "hydra/")):
            continue
        if group_choices(name, conf_dir) or "/" in name:
            if o.is_sweep_override():
                if o.value_type != ValueType.SIMPLE_CHOICE_SWEEP or name == "experiment":
                    return None  # experiments may add keys anywhere
                swept.add(name)  # its keys differ from job to job: left to Hydra
                choice = next(iter(o.sweep_string_iterator()), None)
                groups.append(o.input_line.split("=", 1)[0] + f"={choice}")
            else:
                groups.append(o.input_line)
        elif o.type in (OverrideType.CHANGE, OverrideType.DEL):
            keys.append(o)
    keys = [o for o in keys if o.key_or_group.split(".")[0] not in swept]
    if not keys:
        return None
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=groups)
    except Exception:  # Hydra reports it
        return None
    missing = object()
    for o in keys:
        key = o.key_or_group
        if OmegaConf.select(cfg, key, default=missing, throw_on_resolution_failure=False) is not missing:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node.keys():  # noqa: SIM118 (`in node` misses ??? values)
            continue
        siblings = [str(k) for k in node] if isinstance(node, DictConfig) else []
        near = difflib.get_close_matches(leaf, siblings, n=1)
        if near:
            hint = f"did you mean {parent + '.' if parent else ''}{near[0]}?"
        elif siblings and parent:
            chosen = node.get("name") if group_choices(parent, conf_dir) else None
            owner = f"{parent}={chosen}" if isinstance(chosen, str) else parent
            hint = f"{owner} has: {', '.join(siblings)}"
        else:
            hint = "see conf/config.yaml"
        return f"{o.input_line}: unknown key {key} ({hint})"
    return None
