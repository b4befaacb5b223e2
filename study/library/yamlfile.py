"""Reading the project's YAML files (search spaces, benchmark specs) strictly.

ruamel.yaml's safe loader rejects a mapping that repeats a key, which PyYAML accepts silently (the last
value wins): a search space with two ``learning_rate`` entries would otherwise search only one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class YamlFileError(ValueError):
    """A YAML file that cannot be read; ``str()`` is one line naming the file and the line at fault."""


def read_yaml(path: Path | str) -> Any:
    """The data in ``path`` (YAML 1.2, safe types only). Raises :class:`YamlFileError` on malformed YAML or a
    repeated key, naming the file, the line and the key; ``OSError`` if the file cannot be read."""
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    text = Path(path).read_text()
    try:
        return YAML(typ="safe", pure=True).load(text)
    except DuplicateKeyError as exc:
        first = exc.context_mark.line + 1 if exc.context_mark else "?"
        raise YamlFileError(f"{path}: line {exc.problem_mark.line + 1}: duplicate key "
                            f"{exc.problem.split('duplicate key ', 1)[-1].split(' with value')[0]} (the mapping "
                            f"starting at line {first} already has it)") from None
    except MarkedYAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise YamlFileError(f"{path}: malformed YAML{where}: {exc.problem or exc.context}") from None
    except YAMLError as exc:
        raise YamlFileError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from None


def parse_value(text: str) -> Any:
    """A scalar or flow collection as YAML reads it (``"8"`` -> 8, ``"[1, 2]"`` -> [1, 2]), for ``--set``."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        raise YamlFileError(f"malformed YAML value {text!r}: {getattr(exc, 'problem', None) or exc}") from None
