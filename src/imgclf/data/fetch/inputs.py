"""Lists of image URLs in, one row per URL out.

Read formats (told apart by content, not by the file's name):

- a text file per class, one URL per line (the label is the file name without its suffix), or a
  folder of such files;
- CSV or TSV with a URL column and a label column, header optional, delimiter sniffed;
- ImageNet's ``wnid_index<TAB or space>url`` lines; ``names`` (``words.txt``: ``wnid<TAB>name,
  synonyms``) turns wnids into names.

Blank lines and ``#`` comments are skipped; a line that is not UTF-8 is read as Latin-1. URLs are
normalised (case of scheme and host, default port, fragment, spaces) before they are compared.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from imgclf.core.errors import DataError

WNID_INDEX = re.compile(r"^n\d{8}_\d+$")
WNID = re.compile(r"^n\d{8}$")
TRAILING_LABEL = re.compile(r"^\S+[,;|][^/,;|=&?]+$")  # url,label (a label has no slash or query signs)
URL_LIKE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
LABEL_HEADERS = ("label", "class", "category", "labels", "wnid", "name")
URL_HEADERS = ("url", "image_url", "link", "image", "src", "href")


@dataclass(frozen=True)
class Row:
    url: str  # normalised; the text as read when it is not a valid URL
    label: str
    source: str  # "file:line"
    error: str = ""  # why the URL is invalid (empty when valid)


def normalise_url(text: str) -> tuple[str, str]:
    """(normalised URL, "") or (text, reason it is refused). Only http and https are fetched."""
    text = text.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return text, f"not a URL ({exc})"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return text, f"scheme {scheme + ':' if scheme else '(none)'} is not fetched (http and https only)"
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return text, "no host"
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host.lower()
    except UnicodeError:
        return text, "host is not a valid name"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[scheme]
    netloc = host if port in (None, default) else f"{host}:{port}"
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="=&%:@!$'()*+,;/?-._~")
    return urlunsplit((scheme, netloc, path, query, "")), ""


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines that are not blank or comments; Latin-1 where not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the URL list ({exc.strerror or exc})") from None
    out = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            text = line.decode("latin-1")
        text = text.strip()
        if text and not text.startswith("#"):
            out.append((number, text))
    return out


def read_names(path: str | Path) -> dict[str, str]:
    """ImageNet's words.txt: wnid -> its first name (``n01440764  tench, Tinca tinca`` -> tench)."""
    names = {}
    for _, text in _lines(Path(path)):
        wnid, _, words = text.partition("\t") if "\t" in text else text.partition(" ")
        if WNID.match(wnid.strip()):
            names[wnid.strip()] = words.split(",")[0].strip() or wnid.strip()
    return names


def _kind(lines: list[tuple[int, str]]) -> str:
    """list, imagenet or table, from the first lines (a URL may itself hold commas)."""
    sample = [text for _, text in lines[:50]]
    firsts = [t.split(None, 1) for t in sample]
    if sum(len(f) == 2 and bool(WNID_INDEX.match(f[0])) for f in firsts) * 2 > len(sample):
        return "imagenet"
    header = re.split(r"[,\t;|]", sample[0].lower()) if sample else []
    if len(header) > 1 and any(h.strip() in URL_HEADERS for h in header):
        return "table"
    tabbed = sum("\t" in t for t in sample)
    labelled = sum(bool(TRAILING_LABEL.match(t)) for t in sample)
    return "table" if (tabbed + labelled) * 2 > len(sample) else "list"


def _table_rows(path: Path, lines: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    text = "\n".join(t for _, t in lines)
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",\t;|")
    except csv.Error:
        dialect = csv.excel_tab if "\t" in text else csv.excel
    cells = [next(csv.reader(io.StringIO(t), dialect), []) for _, t in lines]
    header = [c.strip().lower() for c in cells[0]] if cells else []
    has_header = bool(header) and not any(URL_LIKE.match(c) and "//" in c for c in header)
    if has_header:
        url_col = next((header.index(h) for h in URL_HEADERS if h in header), None)
        label_col = next((header.index(h) for h in LABEL_HEADERS if h in header), None)
    else:
        first = cells[0] if cells else []
        url_col = next((i for i, c in enumerate(first) if URL_LIKE.match(c.strip())), None)
        label_col = next((i for i in range(len(first)) if i != url_col), None)
    if url_col is None or label_col is None:
        raise DataError(
            f"{path}: cannot tell the URL and label columns apart; give a header with 'url' and 'label' columns"
        )
    rows = []
    for (number, _), row in zip(lines[1:] if has_header else lines, cells[1:] if has_header else cells):
        if len(row) <= max(url_col, label_col):
            rows.append((number, row[0] if row else "", ""))
        else:
            rows.append((number, row[url_col], row[label_col].strip()))
    return rows


def _file_rows(path: Path, names: dict[str, str]) -> list[tuple[int, str, str]]:
    lines = _lines(path)
    kind = _kind(lines)
    if kind == "list":
        return [(number, text, path.stem) for number, text in lines]
    if kind == "imagenet":
        out = []
        for number, text in lines:
            key, url = text.split(None, 1)
            wnid = key.split("_")[0]
            out.append((number, url, names.get(wnid, wnid)))
        return out
    return _table_rows(path, lines)


def list_files(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path}: the folder holds no URL lists (one text file per class)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def read_rows(inputs: list[str | Path], names: str | Path | None = None) -> list[Row]:
    """Every input row, in input order, with its URL normalised (or the reason it is invalid)."""
    mapping = read_names(names) if names else {}
    rows = []
    for path in list_files(inputs):
        for number, url_text, label in _file_rows(path, mapping):
            url, error = normalise_url(url_text)
            if not label and not error:
                error = "no label"
            rows.append(Row(url, label, f"{path}:{number}", error))
    if not rows:
        raise DataError(f"{', '.join(map(str, inputs))}: no URLs found (blank lines and # comments are skipped)")
    return rows
