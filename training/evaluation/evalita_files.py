"""The EVALITA task files: one reader per task (``read_ami2020``, ``read_ironita2018``,
``read_sentipolc2014``) and the file layouts they accept (``LAYOUTS``).

The user supplies the train and test files. Each reader finds the file's layout from its header
line (the first non-empty line) and accepts exactly these:

* ``ami2020`` — AMI 2020 (automatic misogyny identification), subtask A. The label is the
  ``misogynous`` column: false -> ``non_misogynous`` (said ``no``), true -> ``misogynous``
  (said ``sì``). Instruction: ``Il testo è misogino? Rispondi sì o no.`` Layouts:

  - official: tab-separated, header ``id	text	misogynous	aggressiveness``, labels 0/1
    (``aggressiveness`` is read but not used);
  - single file (below) with the columns ``id``, ``text``, ``misogynous``, ``set``.

* ``ironita2018`` — IronITA 2018 (irony detection), task A. The label is the ``irony`` column:
  false -> ``non_ironic`` (``no``), true -> ``ironic`` (``sì``). Instruction:
  ``Il testo è ironico? Rispondi sì o no.`` Layouts:

  - official: semicolon-separated, fields in double quotes, header
    ``"id";"text";"irony";"sarcasm";"topic"``, labels 0/1;
  - single file with the columns ``id``, ``text``, ``irony``, ``set``.

* ``sentipolc2014`` — SENTIPOLC polarity classification (the paper's "SENTIPOLC 2014"). The
  label comes from the overall polarity pair (``opos``, ``oneg``): (1, 0) -> ``positive``
  (``positivo``), (0, 1) -> ``negative`` (``negativo``), (0, 0) -> ``neutral`` (``neutro``),
  (1, 1) -> ``mixed`` (``misto``). Instruction:
  ``Qual è la polarità del testo? Rispondi positivo, negativo, neutro o misto.`` Layouts:

  - SENTIPOLC 2016 official (its training file and its gold test file): comma-separated,
    header ``idtwitter,subj,opos,oneg,iro,lpos,lneg,top,text``, labels 0/1. The fields may
    be in double quotes or not, header included (``"idtwitter","subj",...``);
  - SENTIPOLC 2014 official: the same without the literal polarity columns ``lpos`` and
    ``lneg``, which 2016 added: header ``idtwitter,subj,opos,oneg,iro,top,text``, quoted or
    not;
  - the 2016 columns with no header line (a gold test file may come without one): taken
    as such when the first line is a record of them, a numeric id then seven 0/1 fields;
  - single file with the columns ``idtwitter``, ``text``, ``opos``, ``oneg``, ``set``.

  In both official layouts the text is the last column, so an unquoted text that holds
  commas is taken whole (the fields beyond the header's are joined back into it).

The single file is one CSV holding both splits: comma-, semicolon- or tab-separated (the
header decides), a header holding the task's columns above in any order, among any others
(which are not read); a ``set`` column whose values are ``train`` or ``test``; label columns
written ``TRUE``/``FALSE`` (any case) instead of 1/0. Read with ``split="train"`` or
``"test"`` it gives that split's rows, in file order; ``split=None`` gives every row.
``evaluate_evalita`` reads its train file with ``"train"`` and its test file with ``"test"``,
so one single file may be given as both. An official file is one split whatever ``split``.

Header names are compared stripped and case-insensitively. All readers use the ``csv``
module, so a quoted field may hold the delimiter, doubled quotes and newlines; a leading BOM
is ignored and blank lines are skipped. A header in no accepted layout raises one line,
``path:line: not a <task> file: its header '...' is in no layout it reads (<task> reads
UTF-8 files in these layouts: ...)``, listing them. A wrong number of fields, a label value
other than the layout's (0/1, or TRUE/FALSE), a ``set`` other than train/test, an empty id
or text, or a single file without rows of the requested split raises ``EvalitaFileError``
(an ``InputFileError``) naming the file and the line where the record starts
(``path:line: message``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corpusfactory.errors import InputFileError


class EvalitaFileError(InputFileError):
    """A task file that is not in the layout its task reads, or holds a bad record."""


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: str


# -- readers -----------------------------------------------------------------------------------

SPLITS = ("train", "test")
_DELIMITER_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon"}


@dataclass(frozen=True)
class Layout:
    """One file layout a reader accepts, recognised by the file's header line."""

    name: str
    delimiters: tuple[str, ...]  # tried in order on the header line
    columns: tuple[str, ...]  # the exact header, or (``single_file``) the columns it must hold
    single_file: bool = False  # a ``set`` column (train/test) and TRUE/FALSE labels
    text_last: bool = False  # fields beyond the header's belong to the last column, the text
    headerless: bool = False  # no header line: ``columns`` from the first line, which is a record

    def match(self, line: str) -> tuple[str, list[str]] | None:
        """(delimiter, column names) when ``line`` is this layout's header, else None."""
        for delimiter in self.delimiters:
            try:
                fields = next(csv.reader([line], delimiter=delimiter), [])
            except csv.Error:
                continue
            names = [f.strip().lower() for f in fields]
            if self.headerless:
                # A record: a numeric id, then the 0/1 columns up to the text.
                flags = names[1 : len(self.columns) - 1]
                if (
                    len(names) >= len(self.columns)
                    and names[0].isdigit()
                    and all(f in ("0", "1") for f in flags)
                ):
                    return delimiter, list(self.columns)
            elif self.single_file:
                if all(names.count(c) == 1 for c in self.columns):
                    return delimiter, names
            elif names == list(self.columns):
                return delimiter, names
        return None

    def describe(self) -> str:
        seps = [_DELIMITER_NAMES.get(d, repr(d)) for d in self.delimiters]
        if self.single_file:
            return (
                f"{self.name}: {'-, '.join(seps[:-1])}- or {seps[-1]}-separated, a header "
                f"holding {list(self.columns)} in any order among other columns, "
                "set train or test, labels TRUE/FALSE"
            )
        quoting = ", quoted or not" if self.text_last else ""
        header = "no header line, columns" if self.headerless else "header"
        return (
            f"{self.name}: {seps[0]}-separated{quoting}, {header} {list(self.columns)}, labels 0/1"
        )


def _single_file(*columns: str) -> Layout:
    return Layout("single file", (",", ";", "\t"), (*columns, "set"), single_file=True)


_SENTIPOLC_2016 = ("idtwitter", "subj", "opos", "oneg", "iro", "lpos", "lneg", "top", "text")
_SENTIPOLC_2014 = ("idtwitter", "subj", "opos", "oneg", "iro", "top", "text")

LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "ami2020": (
        Layout("AMI 2020 official", ("\t",), ("id", "text", "misogynous", "aggressiveness")),
        _single_file("id", "text", "misogynous"),
    ),
    "ironita2018": (
        Layout("IronITA 2018 official", (";",), ("id", "text", "irony", "sarcasm", "topic")),
        _single_file("id", "text", "irony"),
    ),
    "sentipolc2014": (
        Layout("SENTIPOLC 2016 official", (",",), _SENTIPOLC_2016, text_last=True),
        Layout("SENTIPOLC 2014 official", (",",), _SENTIPOLC_2014, text_last=True),
        Layout(
            "SENTIPOLC 2016 gold test without its header",
            (",",),
            _SENTIPOLC_2016,
            text_last=True,
            headerless=True,
        ),
        _single_file("idtwitter", "text", "opos", "oneg"),
    ),
}


def _accepted(task: str) -> str:
    return f"{task} reads UTF-8 files in these layouts: " + "; ".join(
        layout.describe() for layout in LAYOUTS[task]
    )


def _header_line(text: str) -> tuple[int, str | None]:
    """(line number, text) of the first non-empty physical line, the header; (1, None) if none."""
    for number, line in enumerate(io.StringIO(text, newline=""), start=1):
        line = line.rstrip("\r\n")
        if line:
            return number, line
    return 1, None


def _table(path: Path, task: str) -> tuple[Layout, Iterator[tuple[str, dict[str, str]]]]:
    """The file's layout, found from its header, and its records as ``("path:line", row)``.

    The header is checked here, before the first record is asked for; a record's
    problems surface when the iterator reaches it.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except OSError as exc:
        raise EvalitaFileError(f"{path}: cannot open the {task} file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise EvalitaFileError(f"{path}: cannot read the {task} file (UTF-8): {exc}") from exc
    number, line = _header_line(text)
    if line is None:
        raise EvalitaFileError(f"{path}:1: empty file ({_accepted(task)})")
    for layout in LAYOUTS[task]:
        found = layout.match(line)
        if found is not None:
            delimiter, names = found
            return layout, _rows(path, text, layout, delimiter, names)
    shown = line if len(line) <= 200 else line[:200] + "..."
    raise EvalitaFileError(
        f"{path}:{number}: not a {task} file: its header {shown!r} is in no layout it reads "
        f"({_accepted(task)})"
    )


def _rows(
    path: Path, text: str, layout: Layout, delimiter: str, names: list[str]
) -> Iterator[tuple[str, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    end = 0  # last physical line of the previous record; a record starts on the next one
    seen_header = layout.headerless  # a headerless file's first line is a record
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:
                continue
            if not seen_header:  # the line ``_header_line`` found and the layout matched
                seen_header = True
                continue
            where = f"{path}:{start}"
            if layout.text_last and len(row) > len(names):
                # An unquoted text holding the delimiter: the text is the last column.
                row = [*row[: len(names) - 1], delimiter.join(row[len(names) - 1 :])]
            if len(row) != len(names):
                raise EvalitaFileError(f"{where}: expected {len(names)} fields, got {len(row)}")
            yield where, dict(zip(names, row, strict=True))
    except csv.Error as exc:
        raise EvalitaFileError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from exc


def _field(where: str, rec: dict[str, str], column: str) -> str:
    value = rec[column].strip()
    if not value:
        raise EvalitaFileError(f"{where}: empty {column}")
    return value


def _binary(where: str, rec: dict[str, str], column: str, booleans: bool) -> int:
    """A label column as 0/1: written 0/1 in the official layouts, TRUE/FALSE in a single file."""
    value = rec[column].strip()
    if booleans:
        if value.upper() not in ("TRUE", "FALSE"):
            raise EvalitaFileError(f"{where}: {column} must be TRUE or FALSE, got {value!r}")
        return int(value.upper() == "TRUE")
    if value not in ("0", "1"):
        raise EvalitaFileError(f"{where}: {column} must be 0 or 1, got {value!r}")
    return int(value)


MakeExample = Callable[[str, dict[str, str], bool], Example]


def _read(path: str | Path, task: str, split: str | None, make: MakeExample) -> list[Example]:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    path = Path(path)
    layout, rows = _table(path, task)
    out = []
    for where, rec in rows:
        row_split = None
        if layout.single_file:
            row_split = rec["set"].strip().lower()
            if row_split not in SPLITS:
                raise EvalitaFileError(f"{where}: set must be train or test, got {rec['set']!r}")
        example = make(where, rec, layout.single_file)
        if split is None or row_split is None or row_split == split:
            out.append(example)
    if layout.single_file and split is not None and not out:
        raise EvalitaFileError(f"{path}: no {split} rows (set = {split}) in this single file")
    return out


def _ami_example(where: str, rec: dict[str, str], booleans: bool) -> Example:
    label = ("non_misogynous", "misogynous")[_binary(where, rec, "misogynous", booleans)]
    return Example(_field(where, rec, "id"), _field(where, rec, "text"), label)


def _ironita_example(where: str, rec: dict[str, str], booleans: bool) -> Example:
    label = ("non_ironic", "ironic")[_binary(where, rec, "irony", booleans)]
    return Example(_field(where, rec, "id"), _field(where, rec, "text"), label)


_POLARITY = {(1, 0): "positive", (0, 1): "negative", (0, 0): "neutral", (1, 1): "mixed"}


def _sentipolc_example(where: str, rec: dict[str, str], booleans: bool) -> Example:
    pair = (_binary(where, rec, "opos", booleans), _binary(where, rec, "oneg", booleans))
    return Example(_field(where, rec, "idtwitter"), _field(where, rec, "text"), _POLARITY[pair])


def read_ami2020(path: str | Path, split: str | None = None) -> list[Example]:
    """AMI 2020 records of ``path``; of one split (``train``/``test``) if it is a single file."""
    return _read(path, "ami2020", split, _ami_example)


def read_ironita2018(path: str | Path, split: str | None = None) -> list[Example]:
    """IronITA 2018 records of ``path``; of one split if it is a single file."""
    return _read(path, "ironita2018", split, _ironita_example)


def read_sentipolc2014(path: str | Path, split: str | None = None) -> list[Example]:
    """SENTIPOLC records (2014 or 2016 layout) of ``path``; of one split if a single file."""
    return _read(path, "sentipolc2014", split, _sentipolc_example)
