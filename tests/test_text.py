"""Text for a person (text.py): names shown safely in a terminal, a table, a spreadsheet."""

import os

import pytest

from pipeline.text import csv_cell, from_csv_cell, printable


@pytest.mark.parametrize("name, shown", [
    ("ants/001.jpg", "ants/001.jpg"),
    ("\x1b]0;owned\x07x.jpg", "\\x1b]0;owned\\x07x.jpg"),
    ("\x1b[2J\x1b[31mred.jpg", "\\x1b[2J\\x1b[31mred.jpg"),
    ("two\nlines", "two\\x0alines"),
    ("c1\x9bcontrol", "c1\\x9bcontrol"),
    (os.fsdecode(b"caf\xe9.jpg"), "caf\\xe9.jpg"),
    ("café.jpg", "café.jpg"),
    ("\u202eelcric", "\\u202eelcric"),
    ("line\u2028break", "line\\u2028break"),
], ids=["plain", "osc-title", "csi-clear", "newline", "c1-csi", "not-utf8", "utf8", "right-to-left-override",
        "line-separator"])
def test_a_name_is_shown_without_any_control_character(name, shown):
    assert printable(name) == shown


def test_laid_out_text_keeps_its_lines_and_tabs_only():
    assert printable("a\tb\nc\x1b[0m\r", lines=True) == "a\tb\nc\\x1b[0m\\x0d"


@pytest.mark.parametrize("name", ["=1+1", "@SUM(A1)", "'quoted", "-2", "plain"])
def test_a_csv_cell_gives_back_the_name_it_was_made_of(name):
    assert from_csv_cell(csv_cell(name)) == name
