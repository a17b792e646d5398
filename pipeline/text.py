"""Text for a person: a file name's odd bytes shown as \\xNN (as `ls -b` does), text shortened in the middle to fit,
sizes in KB, MB, GB."""

from __future__ import annotations


def printable(text: str) -> str:
    """Text for a person: the bytes of a file name that is not UTF-8 (which Python keeps as surrogate escapes)
    are shown as \\xNN, as `ls -b` would."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name produces
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
