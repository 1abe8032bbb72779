"""Rewrite values in a two-level params file (`section:` / `  key: value  # comment`)
line by line, so every comment, blank line and the order of keys survive.

`set_leaves(text, {"noise": {"rate": 0.6}})` replaces the value of `rate` in section
`noise` in place (its comment stays where it was), appends a key missing from its
section after the section's last key, and a missing section at the end of the file.
The result is parsed again and compared with the intended mapping; any difference
(a layout this editor does not understand) raises ValueError, and the caller falls back
to a plain dump.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_SECTION = re.compile(r"^(?P<name>[A-Za-z_][\w-]*):\s*(#.*)?$")
_KEY = re.compile(r"^(?P<indent>[ ]+)(?P<key>[A-Za-z_][\w-]*):(?P<space>[ ]*)"
                  r"(?P<value>[^#]*?)(?P<gap>[ ]*)(?P<comment>#.*)?$")


def scalar(value: Any) -> str:
    """A scalar as YAML flow text (None -> null, quotes where needed)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def _edit_line(line: str, value: Any) -> str:
    m = _KEY.match(line)
    assert m is not None
    new = scalar(value)
    if not m["comment"]:
        return f"{m['indent']}{m['key']}:{m['space'] or ' '}{new}"
    # Keep the comment's column where the new value leaves room for it.
    head = f"{m['indent']}{m['key']}:{m['space'] or ' '}{new}"
    column = m.start("comment")
    return head + " " * max(1, column - len(head)) + m["comment"]


def set_leaves(text: str, updates: dict[str, dict[str, Any]], *, parse: Any) -> str:
    """`text` with updates[section][key] set; `parse` reads YAML (to check the result)."""
    lines = text.splitlines()
    expected = parse(text) or {}
    for section, values in updates.items():
        if not isinstance(values, dict):
            raise ValueError(f"{section}: not a mapping")
        expected.setdefault(section, {})
        if expected[section] is None:
            expected[section] = {}
        start = next((i for i, line in enumerate(lines)
                      if (m := _SECTION.match(line)) and m["name"] == section), None)
        if start is None:
            lines += ["", f"{section}:"]
            start = len(lines) - 1
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or lines[end].startswith((" ", "#"))):
            end += 1
        for key, value in values.items():
            if isinstance(value, (dict, list)):
                raise ValueError(f"{section}.{key}: not a scalar")
            expected[section][key] = value
            row = next((i for i in range(start + 1, end)
                        if (m := _KEY.match(lines[i])) and m["key"] == key), None)
            if row is not None:
                lines[row] = _edit_line(lines[row], value)
            else:
                last = max([i for i in range(start + 1, end) if _KEY.match(lines[i])],
                           default=start)
                indent = "  "
                if last > start:
                    indent = _KEY.match(lines[last])["indent"]
                lines.insert(last + 1, f"{indent}{key}: {scalar(value)}")
                end += 1
    out = "\n".join(lines) + "\n"
    if parse(out) != expected:
        raise ValueError("the edited file does not read back as intended")
    return out
