"""Open-I / Indiana University chest X-ray reports (3,955 XML reports; NLMCXR_reports.tgz).

Without ``--root`` the archive shipped in the ``torchxrayvision`` package is read in place (it is
CC BY-NC-ND 4.0: never extracted into or committed to this repository). ``--root`` may point to the
same ``.tgz`` or to a folder of the extracted ``*.xml`` files.

- Sections come from the XML's ``AbstractText`` labels (FINDINGS, IMPRESSION, INDICATION, COMPARISON).
- The MeSH "major" terms assigned by people are kept verbatim as ``"mesh": [...]`` in the sample json;
  labels are not taken from them here (the Labeler reads the report; evaluation maps MeSH itself).
- Open-I has no patient identifiers: each report uid (``CXR1234``) is treated as its own patient,
  so the patient-level split is a report-level split for this source.
- With ``--images PATH`` (a folder of the Open-I PNGs named ``CXR1_1_IM-0001-3001.png``) each image of
  a report is a sample ``openi-<uid>-<i>``; otherwise (``--images render``, also the default) one
  sample ``openi-<uid>-0`` per report, whose image is rendered from the report (a phantom).

XML is parsed with ``defusedxml`` with DTDs forbidden (so no entity declarations either): neither
external entities nor entity expansion ("billion laughs") can be triggered by a crafted file. This
is the only XML parser of the project (``llmclip.labels.openi`` reads reports through it too).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmclip import assets
from llmclip.config import ConfigError
from llmclip.data.reports import ReportSections
from llmclip.data.safetar import UnreadableTar, read_members
from llmclip.data.sources import Record, decode_text, make_key

NAME = "openi"
MAX_XML_BYTES = 4 << 20  # a real report is ~10 KB; anything far bigger is not a report
_UID = re.compile(r"(\d+)")
_SECTION = {
    "FINDINGS": "findings",
    "IMPRESSION": "impression",
    "INDICATION": "indication",
    "COMPARISON": "comparison",
}


class UnsafeXML(ValueError):
    pass


def parse_xml(data: bytes) -> ET.Element:
    """Parse one report with defusedxml, refusing DTDs, entity declarations and external references
    (``UnsafeXML``); malformed XML raises ``ET.ParseError``."""
    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException

    try:
        return DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise UnsafeXML(
            f"DTD, entity declaration or external reference in report XML ({type(e).__name__})"
        ) from None


def record_fields(root: ET.Element) -> tuple[str, ReportSections, list[str], list[str]]:
    """(uid, sections, mesh major terms, parent image ids) of one parsed report."""
    uid_el = root.find("uId")
    uid = uid_el.get("id", "") if uid_el is not None else ""
    parts = {}
    for el in root.iter("AbstractText"):
        name = _SECTION.get((el.get("Label") or "").upper())
        if name:
            parts[name] = "".join(el.itertext())
    mesh = [(m.text or "").strip() for m in root.iter("major") if (m.text or "").strip()]
    images = [p.get("id", "") for p in root.iter("parentImage") if p.get("id")]
    return uid, ReportSections.from_parts(**parts), mesh, images


def xml_files(path: Path) -> Iterator[tuple[str, bytes | None]]:
    """(file name, bytes, or None when oversized) of every XML report of the archive or folder, in
    archive/folder order; tar archives go through the safe reader (``llmclip.data.safetar``)."""
    if path.is_dir():
        for p in sorted(path.rglob("*.xml")):
            size = p.stat().st_size
            yield p.name, (p.read_bytes() if size <= MAX_XML_BYTES else None)
        return
    try:
        for m in read_members(path, read=lambda name: name.endswith(".xml"), max_bytes=MAX_XML_BYTES):
            if m.name.endswith(".xml"):
                yield Path(m.name).name, m.data
    except UnreadableTar as e:
        raise ConfigError(f"cannot read Open-I archive {e}", "--root") from None


@dataclass
class OpenISource:
    path: Path
    image_dir: Path | None
    name: str = NAME
    total: int | None = None
    default_images: str | None = "render"  # the packaged reports have no images: draw phantoms

    @property
    def has_images(self) -> bool:
        return self.image_dir is not None

    def __iter__(self) -> Iterator[Record]:
        # Read all (~4K small files), then order by report number: the builder needs a stable order.
        items = []
        for fname, data in xml_files(self.path):
            m = _UID.search(fname)
            items.append((int(m.group(1)) if m else -1, fname, data))
        items.sort(key=lambda t: (t[0], t[1]))
        self.total = len(items)
        for num, fname, data in items:
            fallback = make_key(NAME, Path(fname).stem)
            if data is None:
                yield Record(fallback, NAME, fallback, fallback, error="oversized_file")
                continue
            if decode_text(data) is None:
                yield Record(fallback, NAME, fallback, fallback, error="bad_encoding")
                continue
            try:
                uid, report, mesh, images = record_fields(parse_xml(data))
            except UnsafeXML:
                yield Record(fallback, NAME, fallback, fallback, error="unsafe_xml")
                continue
            except ET.ParseError:
                yield Record(fallback, NAME, fallback, fallback, error="bad_xml")
                continue
            uid = uid or f"CXR{num}"
            pid = uid  # no patient ids in Open-I: one report = one patient
            if self.image_dir is None:
                yield Record(
                    make_key(NAME, uid.removeprefix("CXR"), 0),
                    NAME,
                    pid,
                    uid,
                    "render-0",
                    "PA",
                    report,
                    extra={"mesh": mesh},
                )
                continue
            for i, image_id in enumerate(images):
                yield Record(
                    make_key(NAME, uid.removeprefix("CXR"), i),
                    NAME,
                    pid,
                    uid,
                    image_id,
                    "",
                    report,
                    image_path=self.image_dir / f"{image_id}.png",
                    extra={"mesh": mesh},
                )


def open_source(root: Path | None, images: str | None) -> OpenISource:
    path = root if root is not None else assets.openi_reports_tgz()
    if not path.exists():
        raise ConfigError(f"not found: {path}", "--root")
    image_dir = None
    if images not in (None, "render"):
        image_dir = Path(images)
        if not image_dir.is_dir():
            raise ConfigError(f"image folder not found: {image_dir}", "--images")
    return OpenISource(path, image_dir)
