"""Every name in the design notes' "Public API" section imports as documented, with the
documented parameter names (in order) and defaults; added parameters must have defaults."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT.parent / "shared" / "DESIGN.md"
NO_DEFAULT = object()
UNCHECKED = object()  # a documented default that is a choice ("sgd"|"adamw"), not one value


def split_top_level(text: str) -> list[str]:
    """Split ``text`` on commas that are not inside brackets or quotes."""
    parts, depth, quote = [], 0, ""
    current: list[str] = []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    tail = "".join(current).strip()
    return parts + ([tail] if tail else [])


def documented_parameters(args: str) -> list[tuple[str, object]] | None:
    """``"s=64.0, m"`` -> [("s", 64.0), ("m", NO_DEFAULT)]; ``"labels (N,)"`` -> [("labels", NO_DEFAULT)].

    Empty parentheses name a callable without stating its parameters (``load_full_state_dict()``):
    None, so only the name is checked.
    """
    if not args.strip():
        return None
    params = []
    for part in split_top_level(args):
        name, _, default = part.partition("=")
        found = re.match(r"\s*(\w+)", name)
        assert found is not None, part
        identifier = found.group(1)
        if not default:
            params.append((identifier, NO_DEFAULT))
            continue
        try:
            params.append((identifier, ast.literal_eval(default.strip())))
        except (ValueError, SyntaxError):
            params.append((identifier, UNCHECKED))
    return params


def matching_paren(text: str, start: int) -> int:
    depth = 0
    for pos in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[pos], 0)
        if depth == 0:
            return pos
    raise ValueError(f"unbalanced parentheses in {text!r}")


def documented_api(markdown: str) -> list[tuple[str, list[tuple[str, object]] | None]]:
    """(qualified name, parameters) for every call-like code span of the Public API section.

    A span ``dml.mod.Name(...)`` sets the module; a bare capitalised ``Name(...)`` is in the
    last module named; a bare lower-case ``method(...)`` belongs to the last class named.
    """
    section = markdown.split("## Public API", 1)[1].split("\n## ", 1)[0]
    found, module, owner = [], None, None
    for span in re.findall(r"`([^`]+)`", section):
        match = re.match(r"((?:dml\.)(?:\w+\.)*)?(\w+)\(", span)
        if not match:
            continue
        prefix, name = match.group(1), match.group(2)
        if prefix:
            module = prefix.rstrip(".")
        args = span[match.end() : matching_paren(span, match.end() - 1)]
        if prefix or name[0].isupper():
            qualified = f"{module}.{name}"
            owner = qualified if name[0].isupper() else owner
        else:
            qualified = f"{owner}.{name}"
        found.append((qualified, documented_parameters(args)))
    return found


def resolve(qualified: str):
    """Import ``dml.mod.Name[.method]`` the way a user would: from the module as documented."""
    parts = qualified.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(qualified)


def check_signature(qualified: str, documented: list[tuple[str, object]] | None) -> list[str]:
    obj = resolve(qualified)
    if documented is None:
        return [] if callable(obj) else [f"{qualified} is not callable"]
    params = [
        p
        for p in inspect.signature(obj).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    problems = []
    names = [p.name for p in params[: len(documented)]]
    if names != [name for name, _ in documented]:
        problems.append(f"{qualified}: parameters {names}, documented {[n for n, _ in documented]}")
    for param, (_, default) in zip(params, documented, strict=False):  # params may go on past the documented ones
        actual = NO_DEFAULT if param.default is inspect.Parameter.empty else param.default
        if default is not NO_DEFAULT and default is not UNCHECKED and actual != default:
            problems.append(f"{qualified}: {param.name} defaults to {actual!r}, documented {default!r}")
    for param in params[len(documented) :]:
        if param.default is inspect.Parameter.empty:
            problems.append(f"{qualified}: added parameter {param.name} has no default")
    return problems


def test_documented_signatures_parse_as_expected():
    spans = documented_api(
        "## Public API\n- `dml.losses.ArcFace(s=64.0, m=0.5)`, `CosFace(s, m)`: x\n"
        "- `dml.losses.PartialFC(a, b=None)`: `forward(x (N, D), y (N,)) -> loss`, `save()`, "
        '`configure_optimizer(name="sgd"|"adamw", lr, w=5e-4)`\n## Next\n`dml.other.X(a)`\n'
    )
    assert spans == [
        ("dml.losses.ArcFace", [("s", 64.0), ("m", 0.5)]),
        ("dml.losses.CosFace", [("s", NO_DEFAULT), ("m", NO_DEFAULT)]),
        ("dml.losses.PartialFC", [("a", NO_DEFAULT), ("b", None)]),
        ("dml.losses.PartialFC.forward", [("x", NO_DEFAULT), ("y", NO_DEFAULT)]),
        ("dml.losses.PartialFC.save", None),
        ("dml.losses.PartialFC.configure_optimizer", [("name", UNCHECKED), ("lr", NO_DEFAULT), ("w", 5e-4)]),
    ]


def changed_api(s: float = 32.0, mm: float = 0.5, *, extra: int) -> None:
    """A signature that drifted from its documentation: a default, a name, an undefaulted addition."""


def test_a_renamed_or_undefaulted_parameter_is_reported():
    problems = check_signature(f"{__name__}.changed_api", [("s", 64.0), ("m", 0.5)])
    assert any("defaults to 32.0" in p for p in problems), problems
    assert any("documented ['s', 'm']" in p for p in problems), problems
    assert any("added parameter extra has no default" in p for p in problems), problems
    with pytest.raises(AttributeError):
        resolve("dml.losses.NoSuchLoss")


@pytest.mark.skipif(not DESIGN.is_file(), reason=f"design notes not beside the checkout ({DESIGN})")
def test_every_documented_name_imports_with_its_documented_signature():
    spans = documented_api(DESIGN.read_text(encoding="utf-8"))
    assert len(spans) >= 10, spans  # the section was found and read
    problems = [problem for qualified, params in spans for problem in check_signature(qualified, params)]
    assert not problems, "\n".join(problems)


def test_partial_fc_is_exported_from_dml_losses_and_its_optimizer_is_a_torch_optimizer():
    from dml.losses import ArcFace, PartialFC

    head = PartialFC(8, 5, ArcFace())
    assert isinstance(head.configure_optimizer("sgd", lr=0.1), torch.optim.Optimizer)
    assert "PartialFC" in importlib.import_module("dml.losses").__all__
