"""Every source reader on a folder layout built here (rendered images, real Open-I report text),
with the bad inputs of real dumps: corrupt/missing images, non-UTF-8 text, empty reports, duplicates."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llmclip.data.build import build
from llmclip.data.build_options import BuildOptions
from llmclip.data.shards import read_tar, resolve_shards, verify
from llmclip.data.sources import open_source
from llmclip.data.sources.openi import OpenISource, parse_xml

LABELS = ["No Finding", "Cardiomegaly", "Pleural Effusion"]


def metas(root: Path) -> dict[str, dict]:
    return {
        k: json.loads(m["json"])
        for s in resolve_shards(str(root), "text")
        for k, m in read_tar(s.path)
    }


def png_bytes(seed: int, size: int = 48) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


def run(source: str, root: Path, out: Path, **kw) -> dict:
    return build(
        BuildOptions(
            source=source,
            root=str(root),
            out=str(out),
            workers=1,
            shard_size=4,
            splits=(0.5, 0.25, 0.25),
            **kw,
        ),
        progress=False,
    )


def test_mimic_cxr_layout(tmp_path, openi_texts, openi_jpegs):
    root = tmp_path / "mimic"
    rows, split_rows, label_rows = [], [], []
    n = 0
    for p in range(4):
        subject = f"1000000{p}"
        for s in range(2):
            study = f"5{p}{s}00000"
            rdir = root / "reports" / "files" / f"p{subject[:2]}" / f"p{subject}"
            rdir.mkdir(parents=True, exist_ok=True)
            text = f"FINAL REPORT\n {openi_texts[n].replace('FINDINGS:', chr(10) + ' FINDINGS:')}"
            data = text.encode("utf-8") if (p, s) != (3, 1) else b"FINDINGS: caf\xe9 noir\n"
            (rdir / f"s{study}.txt").write_bytes(data)
            idir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            idir.mkdir(parents=True)
            for v, view in enumerate(("PA", "LATERAL")):
                dicom = f"d{p}{s}{v}-aaaa"
                jpg = openi_jpegs[n % len(openi_jpegs)]
                if (p, s, v) == (0, 0, 1):
                    jpg = jpg[: len(jpg) // 3]  # truncated JPEG
                if (p, s, v) != (1, 1, 1):  # (1,1,1): listed in metadata, file missing
                    (idir / f"{dicom}.jpg").write_bytes(jpg)
                rows.append(
                    {
                        "dicom_id": dicom,
                        "subject_id": subject,
                        "study_id": study,
                        "ViewPosition": view,
                    }
                )
                split_rows.append(
                    {
                        "dicom_id": dicom,
                        "study_id": study,
                        "subject_id": subject,
                        "split": "validate" if p == 2 else "train",
                    }
                )
            n += 1
            if p != 0:  # patient 0 has no CheXpert row: the Labeler labels it
                label_rows.append(
                    {
                        "subject_id": subject,
                        "study_id": study,
                        "Cardiomegaly": "1.0",
                        "Pleural Effusion": "-1.0",
                        "No Finding": "",
                    }
                )

    def write(name, rows_, gz=False):
        f = io.StringIO()
        w = csv.DictWriter(f, fieldnames=list(rows_[0]))
        w.writeheader()
        w.writerows(rows_)
        data = f.getvalue().encode()
        (root / name).write_bytes(gzip.compress(data) if gz else data)

    write("mimic-cxr-2.0.0-metadata.csv.gz", rows, gz=True)
    write("mimic-cxr-2.0.0-split.csv", split_rows)
    write("mimic-cxr-2.0.0-chexpert.csv", label_rows)

    m = run("mimic-cxr", root, tmp_path / "out")
    assert m["records_read"] == 16
    assert m["skipped"] == {"bad_encoding": 2, "bad_image": 1, "missing_image": 1}
    assert (
        m["samples"] == 12 and m["label_source"] == "chexpert+labeler" and not m["synthetic_images"]
    )
    got = metas(tmp_path / "out")
    assert {x["split"] for x in got.values() if x["patient_id"] == "p10000002"} == {
        "val"
    }  # official
    x = got["mimic-d100-aaaa"]
    assert (x["label_source"], x["labels"]) == (
        "chexpert",
        {"Cardiomegaly": 1, "Pleural Effusion": -1},
    )
    assert (x["view"], x["study_id"], x["patient_id"]) == ("PA", "s51000000", "p10000001")
    assert x["report"]["impression"] and "FINAL REPORT" not in x["report"]["full"]
    assert x["report"]["full"].startswith("INDICATION:")
    assert got["mimic-d000-aaaa"]["label_source"] == "labeler"
    assert verify(tmp_path / "out").ok
    img = [s for s in resolve_shards(str(tmp_path / "out"), "image")][0]
    assert all("jpg" in mem for _, mem in read_tar(img.path))  # original bytes kept


def test_chexpert_plus_layout(tmp_path, openi_texts):
    root = tmp_path / "chexpert_plus"
    rows, label_lines = [], []
    for i in range(6):
        rel = f"train/patient0000{i // 2}/study{i % 2 + 1}/view1_frontal.jpg"
        png = root / "PNG" / Path(rel).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(png_bytes(i) if i != 4 else b"\x89PNG\r\n\x1a\n garbage")  # corrupt PNG
        findings = openi_texts[i].split("IMPRESSION:")[0].replace("FINDINGS:", "")
        rows.append(
            {
                "path_to_image": rel,
                "deid_patient_id": f"pid{i // 2}",
                "frontal_lateral": "Frontal",
                "ap_pa": "AP",
                "report": openi_texts[i],
                "section_findings": findings if i % 2 == 0 else "",
                "section_impression": "Small left pleural effusion." if i % 2 == 0 else "",
                "section_clinical_history": "",
                "section_comparison": "",
            }
        )
        if i < 3:
            label_lines.append(
                json.dumps({"path_to_image": rel, "Pleural Effusion": 1.0, "Edema": None})
            )
    rows.append(
        {
            **rows[0],
            "path_to_image": "train/patient00009/study1/view1_frontal.jpg",
            "report": "",
            "section_findings": "",
            "section_impression": "",
        }
    )  # empty report
    with open(root / "df_chexpert_plus_240401.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "chexbert_labels").mkdir()
    (root / "chexbert_labels" / "impression_fixed.json").write_text("\n".join(label_lines))

    m = run("chexpert-plus", root, tmp_path / "out")
    assert m["skipped"] == {"bad_image": 1, "empty_report": 1} and m["samples"] == 5
    got = metas(tmp_path / "out")
    first = got["chexpertplus-train-patient00000-study1-view1_frontal"]
    assert first["labels"] == {"Pleural Effusion": 1} and first["label_source"] == "chexpert"
    assert first["report"]["impression"] == "Small left pleural effusion."
    later = got["chexpertplus-train-patient00002-study2-view1_frontal"]
    assert (
        later["label_source"] == "labeler" and later["report"]["findings"]
    )  # parsed from `report`
    by_patient = defaultdict(set)
    for x in got.values():
        by_patient[x["patient_id"]].add(x["split"])
    assert all(len(v) == 1 for v in by_patient.values())


def test_csv_source_bad_rows_and_render(tmp_path, openi_texts):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes(1))
    (root / "b.png").write_bytes(png_bytes(2))
    (root / "bad.png").write_bytes(b"not a png at all")
    lines = ["key,image,report,patient_id,Cardiomegaly"]
    lines += [
        f'k1,a.png,"{openi_texts[0]}",p1,1',
        f'k2,b.png,"{openi_texts[1]}",p1,',
        f'k1,b.png,"{openi_texts[2]}",p2,0',  # duplicate key
        "k3,a.png,,p3,",  # empty report
        f'k4,bad.png,"{openi_texts[3]}",p4,',
        f'k5,missing.png,"{openi_texts[4]}",p5,',
    ]
    data = "\n".join(lines).encode() + b'\nk6,a.png,"Heart size normal \xff\xfe.",p6,\n'
    (root / "list.csv").write_bytes(data)
    m = run("csv", root / "list.csv", tmp_path / "out")
    assert m["records_read"] == 7 and m["samples"] == 2
    assert m["skipped"] == {
        "bad_encoding": 1,
        "bad_image": 1,
        "duplicate_key": 1,
        "empty_report": 1,
        "missing_image": 1,
    }
    got = metas(tmp_path / "out")
    assert got["csv-k1"]["labels"] == {"Cardiomegaly": 1} and got["csv-k1"]["label_source"] == "csv"
    assert got["csv-k1"]["split"] == got["csv-k2"]["split"]  # same patient, same split
    assert got["csv-k2"]["label_source"] == "labeler"
    small = run("csv", root / "list.csv", tmp_path / "small", max_side=32)
    img = resolve_shards(str(tmp_path / "small"), "image")
    sizes = {Image.open(io.BytesIO(m["png"])).size for s in img for _, m in read_tar(s.path)}
    assert small["samples"] == 2 and sizes == {(32, 32)}  # re-encoded below --max-side
    # the same CSV rendered: images come from the report, marked synthetic
    m2 = run(
        "csv",
        root / "list.csv",
        tmp_path / "rendered",
        images="render",
        image_size=32,
        image_format="png",
    )
    assert m2["synthetic_images"] and m2["samples"] == 4  # bad/missing image files no longer matter
    assert all(x["synthetic_image"] for x in metas(tmp_path / "rendered").values())


def test_openi_image_folder_and_unsafe_xml(tmp_path):
    first = []
    for rec in OpenISource(
        __import__("llmclip.assets", fromlist=["x"]).openi_reports_tgz(), tmp_path
    ):
        first.append(rec)
        if len(first) == 3:
            break
    img_dir = tmp_path / "png"
    img_dir.mkdir()
    for i, rec in enumerate(first):
        if i != 2:
            (img_dir / f"{rec.image_id}.png").write_bytes(png_bytes(i))
    m = run(
        "openi",
        Path(open_source("openi", None, None).path),
        tmp_path / "out",
        images=str(img_dir),
        maxcount=3,
    )
    assert m["samples"] == 2 and m["skipped"] == {"missing_image": 1} and not m["synthetic_images"]
    assert sorted(metas(tmp_path / "out")) == sorted(r.key for r in first[:2])
    # an XML report with an entity declaration is refused, not expanded
    xml_dir = tmp_path / "xml"
    xml_dir.mkdir()
    (xml_dir / "1.xml").write_bytes(
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "boom">]><eCitation>'
        b'<uId id="CXR1"/><AbstractText Label="FINDINGS">&x;</AbstractText></eCitation>'
    )
    (xml_dir / "2.xml").write_bytes(
        b"<eCitation><uId id='CXR2'/><AbstractText Label='FINDINGS'>Normal heart."
        b"</AbstractText></eCitation>"
    )
    (xml_dir / "3.xml").write_bytes(b"<eCitation><unclosed>")
    recs = list(open_source("openi", str(xml_dir), None))
    assert [r.error for r in recs] == ["unsafe_xml", None, "bad_xml"]
    assert recs[1].report.findings == "Normal heart." and recs[1].key == "openi-2-0"
    with pytest.raises(ValueError):
        parse_xml(b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><x/>')
