"""Reading the project's YAML files (run configs, search spaces, table specs) strictly.

PyYAML's ``safe_load`` never runs code, but it still takes three things a hand-written
config should not get away with, each of which cost a run here before:

- **duplicate keys** silently keep the last value (a duplicated dimension drops a grid);
  they are refused, naming the key and both lines;
- **alias bombs** ("billion laughs": ``a: &a [x, x]``, ``b: &b [*a, *a]``, ...) are cheap to
  parse but expand to billions of nodes when walked; the expanded size is bounded;
- **bytes that are not UTF-8** and files too large to be a config are refused up front.

Every problem is a `ConfigError` naming the file (and the key or line) in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bdat_ray.options import ConfigError

#: A config, space or spec is a few kilobytes; anything this large is not one.
MAX_BYTES = 1 << 20
#: Nodes the document may hold once every alias is expanded (the shipped spaces: < 500).
MAX_EXPANDED_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping key written twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *base`` merges may be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if first is not None:
                raise DuplicateKey(key, first.start_mark.line + 1, key_node.start_mark.line + 1)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has with every alias expanded (shared nodes counted once
    per use), without expanding it: a memo per node makes this linear in the parsed size."""
    memo: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in memo:
            return memo[id(node)]
        memo[id(node)] = 1  # a recursive alias counts once instead of looping
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        memo[id(node)] = min(total, MAX_EXPANDED_NODES + 1)
        return memo[id(node)]

    return size(root)


def read_yaml(path: str | Path, key: str) -> Any:
    """The document in ``path`` (None for an empty file). ``key``: the option that named the
    file (``--config``, ``--space``, ``SPEC``), used when the file itself is missing."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(key, f"{file} is a folder, not a YAML file")
    if not file.is_file():
        raise ConfigError(key, f"no such file: {file}")
    try:
        if file.stat().st_size > MAX_BYTES:
            raise ConfigError(str(file), f"is larger than {MAX_BYTES >> 20} MiB; not a config")
        raw = file.read_bytes()
    except OSError as err:
        raise ConfigError(key, f"cannot read {file}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            str(file), f"is not UTF-8 text (byte {err.start} is {raw[err.start]:#04x})"
        ) from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_EXPANDED_NODES:
            raise ConfigError(
                str(file),
                f"expands to more than {MAX_EXPANDED_NODES} values through its aliases (&/*); "
                "write the values out",
            )
        return loader.construct_document(node)
    except DuplicateKey as dup:
        raise ConfigError(
            f"{file}: {dup.key}",
            f"duplicate key on line {dup.line} (first on line {dup.first_line}); "
            "each key may appear once per mapping",
        ) from None
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise ConfigError(str(file), f"not valid YAML: {first}") from None
    except RecursionError:
        raise ConfigError(str(file), "is nested too deeply to be a config") from None
    finally:
        loader.dispose()
