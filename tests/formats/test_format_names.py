"""Tensor names are printable text: refused when they are not, escaped wherever they are printed."""

from __future__ import annotations

import json

import pytest
import torch
from formats_helpers import edit_manifest, read_manifest

import prunekit.formats as pf
from prunekit.apps.cli import main
from prunekit.formats import FormatError
from prunekit.formats.names import escape, problem, show

# (name, what problem() must say): one of each kind of character a name may not hold.
BAD = [
    ("fc\x00weight", "control character U+0000"),
    ("fc\x1b[2J.weight", "control character U+001B"),
    ("fc.weight\nfc.bias  1x1  float32", "control character U+000A"),  # would forge an inspect row
    ("fc\rweight", "control character U+000D"),
    ("fc\x7fweight", "control character U+007F"),
    ("fc\x85weight", "control character U+0085"),  # C1: NEL
    ("fc\x9bweight", "control character U+009B"),  # C1: CSI, an escape sequence of its own
    ("fc\u2028weight", "control character U+2028"),
    ("fc\u202eweight", "bidirectional formatting character U+202E"),  # right-to-left override
    ("fc\u2066weight", "bidirectional formatting character U+2066"),
    ("fc\u200fweight", "bidirectional formatting character U+200F"),
    ("fc\udc80weight", "not valid Unicode text (lone surrogate U+DC80)"),
]
GOOD = ["fc.weight", "Gewichte.ü→λ", "层.权重", "emoji.👍🏽", "a b", "zwj.👩\u200d💻", "quote's",
        "back\\slash"]


@pytest.mark.parametrize("name, why", BAD, ids=[repr(n) for n, _ in BAD])
def test_problem_names_each_bad_character(name, why):
    assert why in problem(name)


@pytest.mark.parametrize("name", GOOD)
def test_printable_text_of_any_script_is_a_valid_name(name):
    assert problem(name) is None
    out = pf.loads(pf.dumps({name: torch.ones(2)}))
    assert list(out) == [name]


@pytest.mark.parametrize("name, why", BAD, ids=[repr(n) for n, _ in BAD])
def test_save_refuses_a_bad_name_with_a_value_error_naming_it(tmp_path, name, why):
    with pytest.raises(ValueError, match="save: key") as info:
        pf.save({"ok": torch.ones(1), name: torch.ones(2)}, tmp_path / "m.pkt")
    message = str(info.value)
    assert why in message and escape(name) in message
    assert message.isprintable()  # one line, nothing for a terminal to interpret
    assert not (tmp_path / "m.pkt").exists()


def _with_name(name: str) -> bytes:
    # The writer refuses such names, so a hostile file is made by editing a valid one.
    def edit(m):
        m["tensors"][0]["name"] = name
    return edit_manifest(pf.dumps({"w": torch.ones(2), "b": torch.zeros(3)}), edit)


@pytest.mark.parametrize("name, why", BAD, ids=[repr(n) for n, _ in BAD])
def test_load_refuses_a_bad_name_with_a_format_error(name, why):
    with pytest.raises(FormatError, match=r"tensors\[0\]\.name") as info:
        pf.loads(_with_name(name))
    assert why in str(info.value) and str(info.value).isprintable()


def test_a_bad_alias_is_a_format_error():
    w = torch.ones(2)
    data = pf.dumps({"w": w, "v": w})
    assert read_manifest(data)["aliases"] == [["v", "w"]]

    def edit(m):
        m["aliases"][0][0] = "v\x1b]0;owned\x07"
    with pytest.raises(FormatError, match=r"aliases\[0\]: the alias .*control character U\+001B") as info:
        pf.loads(edit_manifest(data, edit))
    assert str(info.value).isprintable()


def test_names_that_reach_error_messages_are_escaped():
    # A name that passes the check (printable) still reaches messages through show(): quotes and all.
    data = pf.dumps({"w'\\x": torch.ones(2)})
    with pytest.raises(FormatError, match="has shape") as info:
        pf.loads(data, expected={"w'\\x": (3,)})
    assert show("w'\\x") in str(info.value)
    # A name that is not checked at all (the model's own) is escaped as well.
    with pytest.raises(FormatError, match="missing") as info:
        pf.loads(data, expected={"w'\\x": (2,), "evil\x1b[31m": (1,)})
    assert "\x1b" not in str(info.value) and "evil\\x1b[31m" in str(info.value)


def test_escape_and_show():
    assert escape("fc.weight") == "fc.weight" and show("fc.weight") == "'fc.weight'"
    assert escape("a\nb") == "a\\nb" and escape("x\u202ey") == "x\\u202ey" and escape("\udc80") == "\\udc80"
    assert escape("back\\slash") == "back\\\\slash"  # a literal backslash cannot pass for an escape
    assert escape("x" * 300, 10) == "x" * 10 + "..."
    for name, _ in BAD:
        assert escape(name).isprintable()


def test_inspect_prints_only_escaped_names(tmp_path, capsys):
    # A file written by something else: names with terminal escapes and a forged row. Inspect refuses it,
    # printing the reason on one line, escaped.
    path = tmp_path / "evil.pkt"
    path.write_bytes(_with_name("w\x1b[2J\nfake.row  1  float32  0.0%  dense  4  32.000"))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1 and "\\x1b[2J\\n" in err


def test_inspect_table_escapes_what_it_prints(tmp_path, capsys):
    names = ["a'quote", "back\\slash", "层.权重"]
    path = tmp_path / "m.pkt"
    pf.save({n: torch.ones(2, 2) for n in names}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "back\\\\slash" in out and "a'quote" in out and "层.权重" in out
    assert main(["inspect", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert [r["name"] for r in rows] == names  # JSON carries the names exactly (and escapes non-ASCII itself)


def test_a_path_with_control_characters_is_escaped_in_errors(tmp_path):
    path = tmp_path / "bad\x1b[31m.pkt"
    path.write_bytes(b"not a prunekit file at all")
    with pytest.raises(FormatError) as info:
        pf.load(path, max_bytes=4)
    assert "\x1b" not in str(info.value) and "bad\\x1b[31m.pkt" in str(info.value)
