"""PubMed from NCBI's annual baseline: find the files, and stream-parse (title, abstract) records out of them.

Why our own: `ncbi/pubmed` on the hub is a loading script (refused by `datasets` 5) that points at a baseline that
no longer exists. NCBI republishes the whole baseline every December under a new year prefix
(`pubmed25n0001.xml.gz` ... `pubmed25n1274.xml.gz`, each with a `.md5`), replacing the previous one, so the file
names are discovered from the directory listing rather than written down.

One record per `PubmedArticle` (book records are skipped): `pmid`, `title` = ArticleTitle, `abstract` = every
`AbstractText` section of `Abstract`. Text rules:
- inline markup (`<i>`, `<b>`, `<u>`, `<sub>`, `<sup>`, MathML) is flattened to its text, so `r<sup>2</sup>` reads
  `r2` and `(<i>TERT</i>)` reads `(TERT)`; entities (`&lt;`, `&#xe0;`) are decoded by the XML parser;
  runs of whitespace become one space;
- structured abstracts keep their section labels as PubMed shows them: `OBJECTIVE: ... DESIGN: ...` (a label is a
  few tokens, and it is part of the abstract a reader sees); unlabelled sections are joined with a space;
- a record without an abstract is yielded with an empty `abstract`, so the pair builder drops and counts it with
  the other empty rows (`dropped_empty` in the source's cache and log).
Files are parsed incrementally (`iterparse`, each article cleared once read): memory does not grow with the file.
"""

from __future__ import annotations

import gzip
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

BASELINE_URL = "https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/"
_BASELINE_FILE = re.compile(r'href="(pubmed(\d{2})n(\d{4})\.xml\.gz)"')
_MD5_LINE = re.compile(r"MD5\(([^)]+)\)\s*=\s*([0-9a-fA-F]{32})")
_WHITESPACE = re.compile(r"\s+")


def baseline_files(listing_html: str) -> list[str]:
    """File names of the newest baseline in an NCBI directory listing, in order. While NCBI swaps baselines a
    listing may briefly hold two year prefixes; only the newest is a whole baseline."""
    found = [(int(year), int(number), name) for name, year, number in _BASELINE_FILE.findall(listing_html)]
    if not found:
        return []
    newest = max(year for year, _, _ in found)
    return [name for year, _, name in sorted(set(found)) if year == newest]


def parse_md5(text: str) -> str | None:
    """The checksum in NCBI's `.md5` companion files (`MD5(pubmed25n0001.xml.gz)= <hex>`)."""
    match = _MD5_LINE.search(text)
    return match.group(2).lower() if match else None


def _text(element: ET.Element | None) -> str:
    return _WHITESPACE.sub(" ", "".join(element.itertext())).strip() if element is not None else ""


def _abstract(article: ET.Element) -> str:
    sections = []
    for section in article.iterfind("Abstract/AbstractText"):
        text = _text(section)
        if text:
            label = (section.get("Label") or "").strip()
            sections.append(f"{label}: {text}" if label else text)
    return " ".join(sections)


def iter_records(path: str | Path) -> Iterator[dict[str, str]]:
    """(pmid, title, abstract) of every PubmedArticle in a baseline file (.xml.gz or .xml), streamed."""
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
        for _, element in ET.iterparse(f, events=("end",)):
            if element.tag != "PubmedArticle":
                continue
            citation = element.find("MedlineCitation")
            article = citation.find("Article") if citation is not None else None
            if article is not None:
                yield {
                    "pmid": _text(citation.find("PMID")),
                    "title": _text(article.find("ArticleTitle")),
                    "abstract": _abstract(article),
                }
            element.clear()  # the parsed article is no longer needed: memory stays flat over a 30k-article file


def read_records(paths: list[str]) -> Iterator[dict[str, str]]:
    """Records of several files in order (a `datasets` generator: `paths` is sharded across processes)."""
    for path in paths:
        yield from iter_records(path)
