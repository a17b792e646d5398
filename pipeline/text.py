"""Text for a person: a file name's odd bytes and control characters shown as \\xNN (as `ls -b` does), text
shortened in the middle to fit, sizes in KB, MB, GB."""

from __future__ import annotations

# C0 and C1 control characters, DEL: a name holding ESC [ ... could move a terminal's cursor or retitle its window,
# and a newline would break a table's line; shown as \xNN, as `ls -b` shows them
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
# and the invisible characters that reorder or break what follows them on a line (bidirectional overrides and
# isolates, the line and paragraph separators): a name holding U+202E would show the rest of its line reversed
_CONTROLS |= {c: f"\\u{c:04x}" for c in (*range(0x200E, 0x2010), *range(0x2028, 0x202F), *range(0x2066, 0x206A))}
_CONTROLS_BUT_LINES = {c: shown for c, shown in _CONTROLS.items() if chr(c) not in "\n\t"}


def valid_utf8(text: str) -> str:
    """`text` as valid UTF-8: the bytes of a file name that is not (which Python keeps as surrogate escapes) shown
    as \\xNN, as `ls -b` would; everything else as it is."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name produces
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable(text: str, lines: bool = False) -> str:
    """Text for a person: `valid_utf8`, and control characters shown as \\xNN too, as `ls -b` would. `lines`:
    text laid out in lines (a table, a report) keeps its newlines and tabs; the names that go into one are made
    printable first."""
    return valid_utf8(text).translate(_CONTROLS_BUT_LINES if lines else _CONTROLS)


def shortened_to(text: str, room: int) -> str:
    """`text` shortened in the middle (`abc...xyz`) to `room` characters, when it is longer."""
    if len(text) <= room:
        return text
    keep = room - 3
    return text[:keep - keep // 2] + "..." + text[len(text) - keep // 2:]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# A spreadsheet evaluates a cell that starts with one of these as a formula (OWASP, "CSV Injection")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A value as a CSV cell a spreadsheet shows as text: text that starts like a formula gets a leading `'`
    (OWASP's advice; the spreadsheet hides the quote), and so does text that starts with `'`, so that
    `from_csv_cell` gives every name back exactly. Numbers are left alone."""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, "'")):
        return "'" + value
    return value


def from_csv_cell(cell: str) -> str:
    """The text that csv_cell wrote as `cell`."""
    return cell[1:] if cell.startswith("'") else cell
