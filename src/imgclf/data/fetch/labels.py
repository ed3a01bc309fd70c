"""Labels as safe folder names, with a map back.

A label comes from a file a user was sent: it may hold ``../``, a slash, a Windows device name,
control characters or only dots. Each becomes one folder directly under the data folder; two
labels that differ only in case are refused (they would be one folder on macOS and Windows).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from imgclf.core.errors import DataError

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
MAX_BYTES = 100  # well under every filesystem's 255-byte name limit, with room for a suffix
RESERVED_FOLDERS = ("_rejected",)  # where --keep-rejected puts files; never a class


def safe_folder(label: str) -> str:
    """One path component that means the same label on every filesystem."""
    name = unicodedata.normalize("NFC", label).strip()
    name = _UNSAFE.sub("_", name)
    name = name.strip(" .")  # leading dots hide a folder, trailing dots and spaces vanish on Windows
    if name.split(".")[0].lower() in _RESERVED:
        name = "_" + name
    if name in RESERVED_FOLDERS or name.startswith("_rejected"):
        name = "label" + name
    while len(name.encode("utf-8")) > MAX_BYTES:
        name = name[:-1]
    return name or "_" + hashlib.sha256(label.encode("utf-8")).hexdigest()[:8]


def folder_map(labels: list[str]) -> dict[str, str]:
    """Label -> folder for every label, distinct folders guaranteed; raises DataError when two
    labels differ only in case."""
    by_case: dict[str, str] = {}
    for label in labels:
        key = unicodedata.normalize("NFC", label).casefold()
        other = by_case.setdefault(key, label)
        if other != label:
            raise DataError(
                f"labels {other!r} and {label!r} differ only in case: they would be one folder on "
                "macOS and Windows; rename one of them in the input"
            )
    folders: dict[str, str] = {}
    taken: set[str] = set()
    for label in sorted(set(labels)):
        folder = safe_folder(label)
        if folder.casefold() in taken:  # e.g. "a/b" and "a_b": keep both, told apart by a hash
            folder = f"{folder}-{hashlib.sha256(label.encode('utf-8')).hexdigest()[:6]}"
        taken.add(folder.casefold())
        folders[label] = folder
    return folders
